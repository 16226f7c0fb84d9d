// The conversation list: newest first, a page at a time (GET /v1/conversations), filtered by
// metadata (`key=value` words go to the server as `metadata[key]=value`) and by words of the
// title or id (matched here, on the pages loaded).

import { ApiError, get, post } from './api.js';
import { ago, el } from './render.js';

const PAGE = 50;

export function titleOf(conv) {
  const m = conv.metadata || {};
  return m.title || m.name || m.topic || '';
}

function parseFilter(text) {
  const metadata = [], words = [];
  for (const part of text.trim().split(/\s+/).filter(Boolean)) {
    const eq = part.indexOf('=');
    if (eq > 0) metadata.push([part.slice(0, eq), part.slice(eq + 1)]);
    else words.push(part.toLowerCase());
  }
  return { metadata, words };
}

export async function showList(view, { navigate }) {
  const filter = el('input', 'filter');
  filter.id = 'filter';
  filter.type = 'search';
  filter.placeholder = 'Filter: words of the title, or key=value for metadata';
  filter.value = new URLSearchParams(location.search).get('q') || '';
  const newTitle = el('input', 'new-title');
  newTitle.placeholder = 'Title of a new conversation';
  const create = el('button', 'primary', 'New conversation');
  create.type = 'button';
  create.id = 'new-conversation';
  const tools = el('div', 'list-tools');
  tools.append(filter, newTitle, create);
  const list = el('ul', 'conversations');
  list.id = 'conversations';
  const status = el('p', 'muted list-status');
  const more = el('button', null, 'Load more');
  more.type = 'button';
  more.hidden = true;
  const h = el('h1', null, 'Conversations');
  view.replaceChildren(h, tools, list, status, more);
  document.title = 'branchwise · conversations';

  let after = null, shown = 0, generation = 0;

  async function load(reset) {
    const mine = reset ? ++generation : generation;
    if (reset) { after = null; shown = 0; list.replaceChildren(); }
    const { metadata, words } = parseFilter(filter.value);
    const params = new URLSearchParams({ limit: String(PAGE), order: 'desc' });
    for (const [k, v] of metadata) params.append(`metadata[${k}]`, v);
    if (after) params.set('after', after);
    status.textContent = 'Loading…';
    more.hidden = true;
    let page;
    try {
      page = await get(`/v1/conversations?${params}`);
    } catch (e) {
      if (mine === generation) status.textContent = e instanceof ApiError ? e.message : String(e);
      return;
    }
    if (mine !== generation) return; // a newer filter is loading
    for (const conv of page.data) {
      const title = titleOf(conv);
      const hay = `${title} ${conv.id}`.toLowerCase();
      if (words.length && !words.every((w) => hay.includes(w))) continue;
      list.append(entry(conv, title));
      shown += 1;
    }
    after = page.last_id;
    more.hidden = !page.has_more;
    status.textContent = shown ? '' : page.has_more ? 'No match on this page.'
      : filter.value ? 'No conversation matches.' : 'No conversations yet: make one here, or through the API.';
  }

  function entry(conv, title) {
    const li = el('li', 'conv');
    li.dataset.conversationId = conv.id;
    const a = el('a');
    a.href = `/conversations/${encodeURIComponent(conv.id)}`;
    a.dataset.link = '';
    a.append(el('span', title ? 'title' : 'title untitled', title || 'Untitled'), el('code', 'id', conv.id),
      el('span', 'when muted', ago(conv.created_at)));
    const meta = Object.entries(conv.metadata || {}).filter(([k]) => k !== 'title');
    if (meta.length) a.append(el('span', 'meta muted', meta.map(([k, v]) => `${k}=${v}`).join(' ')));
    if (conv.forked_from) a.append(el('span', 'fork muted', `fork of ${conv.forked_from.conversation_id}`));
    li.append(a);
    return li;
  }

  let timer = null;
  filter.addEventListener('input', () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      const url = filter.value ? `/?q=${encodeURIComponent(filter.value)}` : '/';
      history.replaceState(null, '', url);
      load(true);
    }, 250);
  });
  more.addEventListener('click', () => load(false));
  create.addEventListener('click', async () => {
    const title = newTitle.value.trim();
    try {
      const conv = await post('/v1/conversations', { metadata: title ? { title } : {} });
      navigate(`/conversations/${encodeURIComponent(conv.id)}`);
    } catch (e) {
      status.textContent = e.message;
    }
  });
  await load(true);
}
