// The compose box: one message sent to 1-4 parallel branches (`n` alternatives of one input,
// streamed as one Server-Sent Events stream, docs/streaming.md) shown side by side as they
// arrive, each with its model, tokens and latency; "Continue with this" moves the head to the
// one picked.

import { ApiError, get, post, stream } from './api.js';
import { el, markdown } from './render.js';

const MODEL_KEY = 'branchwise.model';

export class Compose {
  // host: {conversationId, headItem(), base() -> {item, excerpt} | null, clearBase(), refresh(), moveHead(itemId)}
  constructor(root, host) {
    this.root = root;
    this.host = host;
    this.base = el('div', 'base-chip');
    this.base.hidden = true;
    this.streams = el('div', 'streams');
    this.close = el('button', 'link close', 'close');
    this.close.type = 'button';
    this.close.title = 'Hide these answers (they stay in the tree)';
    this.streamsBox = el('div', 'streams-box');
    this.streamsBox.append(this.close, this.streams);
    this.streamsBox.hidden = true;
    this.error = el('div', 'compose-error');
    this.error.hidden = true;
    this.text = el('textarea', 'message');
    this.text.id = 'message';
    this.text.rows = 2;
    this.text.placeholder = 'Message (Ctrl+Enter to send)';
    this.model = el('input', 'model');
    this.model.id = 'model';
    this.model.placeholder = 'model';
    this.model.setAttribute('list', 'models');
    this.model.value = localStorage.getItem(MODEL_KEY) || '';
    this.models = el('datalist');
    this.models.id = 'models';
    this.n = el('select', 'n');
    this.n.id = 'branches';
    this.n.title = 'How many parallel branches to send this message to';
    for (const k of [1, 2, 3, 4]) {
      const o = el('option', null, k === 1 ? '1 branch' : `${k} branches`);
      o.value = String(k);
      this.n.append(o);
    }
    this.sendButton = el('button', 'primary', 'Send');
    this.sendButton.type = 'button';
    this.sendButton.id = 'send';
    this.stopButton = el('button', null, 'Stop');
    this.stopButton.type = 'button';
    this.stopButton.hidden = true;
    const side = el('div', 'compose-side');
    side.append(this.model, this.models, this.n, this.sendButton, this.stopButton);
    const line = el('div', 'compose-row');
    line.append(this.text, side);
    root.replaceChildren(this.streamsBox, this.base, this.error, line);

    this.sendButton.addEventListener('click', () => this.send());
    this.stopButton.addEventListener('click', () => this.abort && this.abort.abort());
    this.close.addEventListener('click', () => { this.streamsBox.hidden = true; });
    this.text.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); this.send(); }
    });
    this.base.addEventListener('click', (e) => { if (e.target.closest('button')) this.host.clearBase(); });
    this.loadModels();
  }

  async loadModels() {
    try {
      const list = await get('/v1/models');
      this.models.replaceChildren(...list.data.map((m) => { const o = el('option'); o.value = m.id; return o; }));
      if (!this.model.value && list.data.length) this.model.value = list.data[0].id;
    } catch { /* a 401 is announced by api.js; the field stays free text */ }
  }

  showBase(base) {
    this.base.hidden = !base;
    if (!base) return;
    const x = el('button', 'link', '×');
    x.type = 'button';
    x.title = 'Continue from the head instead';
    this.base.replaceChildren(el('span', null, 'Continuing from '), el('code', null, base.item),
      el('span', 'muted', base.excerpt ? ` “${base.excerpt}”` : ''), x);
    this.text.focus();
  }

  fail(message) {
    this.error.hidden = !message;
    this.error.textContent = message || '';
  }

  async send() {
    const text = this.text.value.trim();
    const model = this.model.value.trim();
    if (!text || this.busy) return;
    if (!model) { this.fail('Name a model to send to.'); this.model.focus(); return; }
    localStorage.setItem(MODEL_KEY, model);
    const n = Number(this.n.value);
    this.fail(null);
    this.busy = true;
    this.sendButton.disabled = true;
    this.stopButton.hidden = false;
    this.abort = new AbortController();
    const cards = [];
    for (let i = 0; i < n; i++) cards.push(this.card(i, model));
    this.streams.replaceChildren(...cards.map((c) => c.root));
    this.streamsBox.hidden = false;
    this.close.hidden = true;
    this.streams.dataset.state = 'streaming';
    try {
      const base = this.host.base();
      if (base && base.item !== this.host.headItem()) await this.host.moveHead(base.item);
      const started = performance.now();
      const body = { model, input: text, conversation: this.host.conversationId, stream: true, store: true };
      if (n > 1) body.n = n;
      this.text.value = '';
      await stream('/v1/responses', body, (event) => this.event(event, cards, started), this.abort.signal);
      this.host.clearBase();
    } catch (e) {
      if (e.name === 'AbortError') this.fail('Stopped here; the server finishes and stores what was asked.');
      else this.fail(e instanceof ApiError ? e.message : `Sending failed: ${e.message}`);
      if (!this.text.value) this.text.value = text;
    } finally {
      for (const card of cards) {  // a stream that ended without its terminal event
        if (card.root.dataset.state === 'waiting' || card.root.dataset.state === 'streaming') {
          this.setState(card, card.root.dataset.state === 'waiting' ? 'not sent' : 'interrupted');
        }
      }
      this.busy = false;
      this.sendButton.disabled = false;
      this.stopButton.hidden = true;
      this.streams.dataset.state = 'done';
      this.close.hidden = false;
      await this.host.refresh({ toHead: true });
      this.markHead();
    }
  }

  card(i, model) {
    const root = el('div', 'stream');
    root.dataset.alternative = String(i);
    root.dataset.state = 'waiting';
    const head = el('div', 'stream-head');
    const title = el('strong', null, `Branch ${i + 1}`);
    const modelEl = el('span', 'muted', model);
    const state = el('span', 'state', 'waiting');
    head.append(title, modelEl, state);
    const body = el('div', 'stream-body');
    const stats = el('div', 'stats muted');
    const pick = el('button', null, 'Continue with this');
    pick.type = 'button';
    pick.disabled = true;
    pick.dataset.pick = '';
    root.append(head, body, stats, pick);
    const card = { root, body, stats, pick, state, modelEl, text: '', first: null, item: null };
    pick.addEventListener('click', async () => {
      if (!card.item) return;
      pick.disabled = true;
      try { await this.host.moveHead(card.item); } catch (e) { this.fail(e.message); }
      await this.host.refresh({ toHead: true });
      this.markHead();
    });
    return card;
  }

  event(ev, cards, started) {
    const card = cards[ev.alternative ?? 0];
    if (!card) return;
    const now = performance.now();
    switch (ev.type) {
      case 'response.created':
        card.root.dataset.responseId = ev.response.id;
        this.setState(card, 'streaming');
        break;
      case 'response.output_text.delta':
        if (card.first === null) card.first = now - started;
        card.text += ev.delta;
        card.body.textContent = card.text; // plain text while it streams; markdown once done
        break;
      case 'response.completed':
      case 'response.incomplete':
      case 'response.failed': {
        const r = ev.response;
        const out = (r.output || []).filter((o) => o.id);
        card.item = out.length && ev.type !== 'response.failed' ? out[out.length - 1].id : null;
        if (card.item) card.root.dataset.item = card.item;
        card.modelEl.textContent = r.model || card.modelEl.textContent;
        const u = r.usage;
        const total = Math.round(now - started);
        card.stats.textContent = [
          u ? `${u.input_tokens} in · ${u.output_tokens} out tokens` : null,
          card.first !== null ? `first token ${Math.round(card.first)} ms` : null,
          `${total} ms`,
        ].filter(Boolean).join(' · ');
        if (ev.type === 'response.failed') {
          card.body.textContent = `Failed: ${r.error ? r.error.message : r.status}`;
        } else {
          card.body.replaceChildren(markdown(card.text));
        }
        card.pick.disabled = !card.item;
        this.setState(card, ev.type === 'response.completed' ? 'completed' : r.status || 'failed');
        break;
      }
      default:
    }
  }

  setState(card, state) {
    card.root.dataset.state = state;
    card.state.textContent = state;
  }

  markHead() {
    const head = this.host.headItem();
    for (const c of this.streams.querySelectorAll('.stream')) {
      const card = c.querySelector('[data-pick]');
      const isHead = !!head && c.dataset.item === head;
      c.classList.toggle('is-head', isHead);
      if (isHead) card.textContent = 'The conversation continues here';
      else if (c.dataset.item) card.textContent = 'Continue with this';
      card.disabled = isHead || !c.dataset.item;
    }
  }
}
