// A conversation's page (/conversations/{id}): its whole tree, the actions on any item (make it
// the head, continue from it, fork there) and the compose box.

import { ApiError, get, post, wholeTree } from './api.js';
import { Compose } from './compose.js';
import { el } from './render.js';
import { titleOf } from './list.js';
import { TreeView } from './tree.js';

export async function showConversation(view, id, { navigate }) {
  const path = `/v1/conversations/${encodeURIComponent(id)}`;
  const title = el('h1', 'title', '…');
  const idEl = el('code', 'conv-id', id);
  const forked = el('span', 'forked muted');
  const meta = el('span', 'meta muted');
  const stats = el('span', 'tree-stats muted');
  const tools = el('div', 'tree-tools');
  const button = (text, fn, id_) => {
    const b = el('button', null, text);
    b.type = 'button';
    if (id_) b.id = id_;
    b.addEventListener('click', fn);
    return b;
  };
  const header = el('div', 'conv-head');
  const line = el('div', 'conv-line');
  line.append(title, idEl, forked);
  header.append(line, meta, tools);
  const treeEl = el('div', 'tree');
  treeEl.id = 'tree';
  const notice = el('div', 'notice');
  notice.hidden = true;
  const composeEl = el('div', 'compose');
  composeEl.id = 'compose';
  const scroller = el('div', 'tree-scroll');
  scroller.append(treeEl);
  view.replaceChildren(header, notice, scroller, composeEl);
  document.title = `branchwise · ${id}`;

  let conv = null, tree = null, base = null;
  const say = (text, kind = 'info') => {
    notice.hidden = !text;
    notice.dataset.kind = kind;
    notice.textContent = text || '';
  };

  const treeView = new TreeView(treeEl, {
    select: (n) => info(n),
    action: (name, n) => act(name, n).catch((e) => say(e.message, 'error')),
  });

  const compose = new Compose(composeEl, {
    conversationId: id,
    headItem: () => conv && conv.head,
    base: () => base,
    clearBase: () => { base = null; compose.showBase(null); },
    refresh: async ({ toHead = false } = {}) => {
      await refresh();
      if (toHead && tree && tree.headNode) treeView.scrollTo(tree.headNode);
    },
    moveHead: async (item) => { conv = await post(`${path}/head`, { item_id: item }); },
  });

  tools.append(
    stats,
    button('Unfold all', () => treeView.setFolded(false), 'unfold-all'),
    button('Fold long runs', () => treeView.setFolded(true), 'fold-all'),
    button('Go to head', () => conv && conv.head && treeView.scrollTo(tree.headNode), 'go-head'),
    button('Reload', () => refresh(), 'reload'),
  );

  async function info(n) {
    const rid = n.row.response_id;
    if (!rid) return;
    treeView.info('…');
    try {
      const r = await get(`/v1/responses/${encodeURIComponent(rid)}`);
      if (treeView.selected !== n) return;
      const u = r.usage;
      const secs = r.completed_at && r.created_at ? `${r.completed_at - r.created_at} s` : null;
      treeView.info([r.model, u ? `${u.input_tokens} in · ${u.output_tokens} out tokens` : null, secs && `took ≈${secs}`,
        r.status !== 'completed' ? r.status : null].filter(Boolean).join(' · '));
    } catch (e) {
      if (treeView.selected === n) treeView.info(e.message);
    }
  }

  async function act(name, n) {
    const item = n.row.id;
    if (name === 'head') {
      conv = await post(`${path}/head`, { item_id: item });
      await refresh();
      say(`The head is now ${item}: the next message continues from there.`);
    } else if (name === 'continue') {
      base = { item, excerpt: treeView.excerpt(n.node) };
      compose.showBase(base);
    } else if (name === 'fork') {
      // /fork takes an item of the conversation's current path; elsewhere in the tree the fork
      // starts at the head and then moves to the item (both conversations share the tree).
      const onPath = treeView.tree.onHead.has(n.node);
      let fork = await post(`${path}/fork`, onPath ? { item_id: item, metadata: forkMeta() } : { metadata: forkMeta() });
      if (!onPath) fork = await post(`/v1/conversations/${encodeURIComponent(fork.id)}/head`, { item_id: item });
      navigate(`/conversations/${encodeURIComponent(fork.id)}`);
    }
  }

  function forkMeta() {
    const t = conv && titleOf(conv);
    return t ? { title: `${t} (fork)`.slice(0, 512) } : {};
  }

  async function refresh() {
    try {
      [conv, tree] = await Promise.all([get(path), wholeTree(id)]);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        title.textContent = 'Not found';
        say(`There is no conversation ${id} on this server.`, 'error');
        composeEl.hidden = true;
      } else {
        say(e.message, 'error');
      }
      return;
    }
    const t = titleOf(conv);
    title.textContent = t || 'Untitled';
    title.classList.toggle('untitled', !t);
    forked.replaceChildren();
    if (conv.forked_from) {
      const a = el('a', null, conv.forked_from.conversation_id);
      a.href = `/conversations/${encodeURIComponent(conv.forked_from.conversation_id)}`;
      a.dataset.link = '';
      forked.append('fork of ', a);
    }
    const pairs = Object.entries(conv.metadata || {}).filter(([k]) => k !== 'title');
    meta.textContent = pairs.map(([k, v]) => `${k}=${v}`).join('  ');
    const started = performance.now();
    treeView.render(tree);
    const ms = performance.now() - started;
    treeEl.dataset.renderMs = ms.toFixed(1);
    const { order, leaves } = treeView.tree;
    stats.textContent = `${order.length} ${order.length === 1 ? 'item' : 'items'} · ${leaves} `
      + `${leaves === 1 ? 'branch' : 'branches'}`
      + (tree.truncated ? ' · (tree cut at 100,000 items)' : '');
    if (!order.length) say('This conversation has no items yet: send the first message below.', 'empty');
    else if (notice.dataset.kind === 'error' || notice.dataset.kind === 'empty') say(null);
  }

  await refresh();
  if (tree && tree.headNode) treeView.scrollTo(tree.headNode);
}
