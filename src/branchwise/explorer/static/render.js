// Items as DOM. Message text is untrusted (any user or model wrote it): markdown goes through
// marked, then DOMPurify with a short list of allowed tags and attributes; everything else is
// set as text, never as markup. HTML written in a message is shown as the text it is (as chat
// clients do), never parsed as markup. Images load only from data: URLs (a remote one would be
// a request leaving this server; it becomes a link); links open in a new tab, http(s) and
// mailto only.

import { Marked } from './vendor/marked-18.3.0.esm.js';
import DOMPurify from './vendor/purify-3.5.0.es.js';

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
const DATA_IMAGE = /^data:image\/(?:png|gif|jpeg|webp);/i;

const marked = new Marked({
  gfm: true,
  breaks: true,
  async: false,
  renderer: {
    html({ text, block }) {
      return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    image({ href, text }) {
      if (DATA_IMAGE.test(href || '')) return `<img src="${escapeHtml(href)}" alt="${escapeHtml(text)}">`;
      return `<a href="${escapeHtml(href || '')}">[image${text ? `: ${escapeHtml(text)}` : ''}]</a>`;
    },
  },
});

const PURIFY = {
  ALLOWED_TAGS: ['p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'em', 'strong', 'b', 'i', 'u', 'del', 's',
    'mark', 'sub', 'sup', 'kbd', 'code', 'pre', 'blockquote', 'ul', 'ol', 'li', 'a', 'img', 'table', 'thead',
    'tbody', 'tr', 'th', 'td', 'details', 'summary', 'span', 'div'],
  ALLOWED_ATTR: ['href', 'title', 'alt', 'src', 'start', 'colspan', 'rowspan', 'align'],
  ALLOW_DATA_ATTR: false,
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#|data:image\/(?:png|gif|jpeg|webp);)/i,
  RETURN_DOM_FRAGMENT: true,
};

// Runs inside DOMPurify's inert document, before any element reaches this page: an image
// from anywhere but a data: URL loses its source here, so it is never fetched.
DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.nodeName === 'A') {
    if (/^data:/i.test(node.getAttribute('href') || '')) node.removeAttribute('href');
    if (node.hasAttribute('href')) {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer nofollow');
    }
  } else if (node.nodeName === 'IMG') {
    const src = node.getAttribute('src') || '';
    if (!/^data:image\//i.test(src)) {
      node.removeAttribute('src');
      node.setAttribute('title', src ? `image not loaded: ${src}` : 'image');
    }
  }
});

export function markdown(text) {
  const box = document.createElement('div');
  box.className = 'md';
  box.append(DOMPurify.sanitize(marked.parse(text), PURIFY));
  for (const img of box.querySelectorAll('img:not([src])')) {
    const note = document.createElement('span');
    note.className = 'img-note';
    note.textContent = `[image${img.alt ? `: ${img.alt}` : ''}]`;
    note.title = img.title;
    img.replaceWith(note);
  }
  return box;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function pre(text, cls = 'code') {
  const p = el('pre', cls);
  p.textContent = text;
  return p;
}

function pretty(json) {
  try { return JSON.stringify(JSON.parse(json), null, 2); } catch { return String(json); }
}

// The plain text of an item (for excerpts, titles, search): never markup.
export function itemText(item) {
  if (!item) return '';
  switch (item.type) {
    case 'message':
      return (item.content || []).map((p) => p.text ?? p.refusal ?? (p.type === 'input_image' ? '[image]'
        : p.type === 'input_file' ? `[file ${p.filename || ''}]` : '')).join(' ');
    case 'function_call': return `${item.name}(${item.arguments || ''})`;
    case 'function_call_output': return typeof item.output === 'string' ? item.output : JSON.stringify(item.output);
    case 'reasoning':
      return [...(item.summary || []), ...(item.content || [])].map((p) => p.text || '').join(' ');
    default: return '';
  }
}

function messageBody(item) {
  const body = el('div', 'body');
  for (const part of item.content || []) {
    if (part.type === 'input_text' || part.type === 'output_text' || part.type === 'text') {
      body.append(markdown(part.text || ''));
    } else if (part.type === 'refusal') {
      body.append(el('p', 'refusal', `Refusal: ${part.refusal || ''}`));
    } else if (part.type === 'input_image') {
      const url = part.image_url || '';
      if (DATA_IMAGE.test(url)) {
        const img = el('img', 'attached');
        img.alt = 'attached image';
        img.src = url;
        body.append(img);
      } else {
        body.append(el('p', 'img-note', `[image${url ? `: ${url}` : part.file_id ? ` ${part.file_id}` : ''}]`));
      }
    } else if (part.type === 'input_file') {
      body.append(el('p', 'img-note', `[file ${part.filename || part.file_id || ''}]`));
    } else {
      body.append(pre(JSON.stringify(part, null, 2)));
    }
  }
  return body;
}

// The body of any item, as it should be read: messages as markdown, tool calls and their
// outputs as such, reasoning folded.
export function itemBody(item) {
  if (!item) return el('div', 'body muted', '(item not loaded)');
  switch (item.type) {
    case 'message': return messageBody(item);
    case 'function_call': {
      const body = el('div', 'body tool');
      const head = el('div', 'tool-head');
      head.append(el('span', 'tool-kind', 'call'), el('code', 'tool-name', item.name || '?'),
        el('span', 'muted', ` ${item.call_id || ''}`));
      body.append(head, pre(pretty(item.arguments || '')));
      return body;
    }
    case 'function_call_output': {
      const body = el('div', 'body tool');
      const head = el('div', 'tool-head');
      head.append(el('span', 'tool-kind', 'output'), el('span', 'muted', ` for ${item.call_id || '?'}`));
      const out = typeof item.output === 'string' ? pretty(item.output) : JSON.stringify(item.output, null, 2);
      body.append(head, pre(out));
      return body;
    }
    case 'reasoning': {
      const body = el('div', 'body');
      const d = el('details', 'reasoning');
      d.append(el('summary', null, 'Reasoning'));
      for (const p of [...(item.summary || []), ...(item.content || [])]) d.append(markdown(p.text || ''));
      body.append(d);
      return body;
    }
    default: {
      const body = el('div', 'body');
      body.append(pre(JSON.stringify(item, null, 2)));
      return body;
    }
  }
}

export function label(row) {
  if (row.type === 'message') return row.role || 'message';
  return { function_call: 'tool call', function_call_output: 'tool output' }[row.type] || row.type;
}

export function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

export { el };
