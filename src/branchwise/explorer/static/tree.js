// The whole tree of a conversation as a graph: one row per node, each row a lane's dot and the
// item's card, and one SVG behind the rows for the edges. At a node with several children the
// biggest subtree (the latest, among equals) is the main line: it keeps its parent's lane and
// comes last; the other children come first, in the order they were made, each in a lane of its
// own from its parent's row down to its last row, which frees the lane again. Side branches
// thus sit right under the message they branch from, and a long main line stays straight in
// one lane with few lanes beside it. Linear runs longer than RUN_FOLD items fold to their two first and last items.

import { el, itemBody, itemText, label } from './render.js';

const RUN_FOLD = 8;
const DOT_Y = 17; // px from a row's top to its dot: the middle of the card's first line
const LANE_X = 6; // px left of the first lane (app.css: --lane-x), so that no dot is cut off
const SVG = 'http://www.w3.org/2000/svg';

export function layout(rows, headNode) {
  const byNode = new Map();
  for (const row of rows) {
    byNode.set(row.node, { row, node: row.node, parent: row.parent_node, children: [], lane: 0, index: 0, run: -1 });
  }
  const roots = [];
  for (const n of byNode.values()) {
    const p = n.parent !== null ? byNode.get(n.parent) : undefined;
    if (p) p.children.push(n); else roots.push(n);
  }
  const onHead = new Set();
  for (let n = byNode.get(headNode); n; n = byNode.get(n.parent)) onHead.add(n.node);

  // subtree sizes: rows come in the order they were stored, so every parent before its children
  const size = new Map();
  for (let i = rows.length - 1; i >= 0; i--) {
    const n = byNode.get(rows[i].node);
    size.set(n.node, (size.get(n.node) || 0) + 1);
    if (n.parent !== null && byNode.has(n.parent)) size.set(n.parent, (size.get(n.parent) || 0) + size.get(n.node));
  }
  for (const n of byNode.values()) {
    if (n.children.length < 2) continue;
    let main = 0;
    n.children.forEach((c, i) => { if (size.get(c.node) >= size.get(n.children[main].node)) main = i; });
    n.children.push(...n.children.splice(main, 1)); // the main line last
  }

  const order = [];
  const used = [];
  const alloc = (right) => { // the first free lane right of lane `right`: branches go rightwards
    let i = used.indexOf(false, right + 1);
    if (i < 0) { i = used.length; used.push(true); } else used[i] = true;
    return i;
  };
  const stack = [];
  for (let i = roots.length - 1; i >= 0; i--) stack.push([roots[i], -1]);
  while (stack.length) {
    const [n, reserved] = stack.pop();
    n.lane = reserved >= 0 ? reserved : alloc(-1);
    n.index = order.length;
    order.push(n);
    const kids = n.children;
    if (!kids.length) { used[n.lane] = false; continue; }
    const last = kids.length - 1;
    const lanes = kids.slice(0, last).map(() => alloc(n.lane));
    stack.push([kids[last], n.lane]);
    for (let i = last - 1; i >= 0; i--) stack.push([kids[i], lanes[i]]);
  }

  // runs: a start (a root, or a child of a node with several) and its only-children below
  const runs = [];
  for (const n of order) {
    const p = byNode.get(n.parent);
    if (p && p.children.length === 1) continue;
    const chain = [n];
    for (let last = n; last.children.length === 1; last = last.children[0]) chain.push(last.children[0]);
    for (const m of chain) m.run = runs.length;
    runs.push({ nodes: chain, onHead: chain.some((m) => onHead.has(m.node)) });
  }
  return { order, byNode, onHead, runs, lanes: used.length, leaves: order.filter((n) => !n.children.length).length };
}

export class TreeView {
  // handlers: {select(n), action(name, n)}
  constructor(root, handlers) {
    this.root = root;
    this.handlers = handlers;
    this.svg = document.createElementNS(SVG, 'svg');
    this.svg.classList.add('edges');
    this.svg.setAttribute('aria-hidden', 'true');
    this.rowsEl = el('div', 'rows');
    root.replaceChildren(this.svg, this.rowsEl);
    this.folded = new Set(); // runs folded
    this.unfolded = new Set(); // runs the user opened
    this.rowOf = new Map();
    this.bodies = new Map(); // node -> its item's rendered body: nodes never change, so kept across renders
    this.selected = null;
    this.pending = false;
    this.resize = new ResizeObserver(() => this.schedule());
    this.resize.observe(this.rowsEl);
    this.rowsEl.addEventListener('click', (e) => this.click(e));
  }

  render(tree) {
    const keep = this.selected && this.selected.node;
    this.tree = layout(tree.rows, tree.headNode);
    this.headNode = tree.headNode;
    const { order, runs, lanes } = this.tree;
    const w = Math.max(8, Math.min(18, 360 / Math.max(1, lanes)));
    this.laneW = w;
    this.root.style.setProperty('--lane-w', `${w}px`);
    this.root.style.setProperty('--gutter', `${lanes * w + 2 * LANE_X + 4}px`);

    this.folded = new Set();
    runs.forEach((run, i) => {
      if (run.nodes.length > RUN_FOLD && !run.onHead && !this.unfolded.has(run.nodes[0].node)) this.folded.add(i);
    });
    const frag = document.createDocumentFragment();
    this.rowOf = new Map();
    this.toggles = new Map();
    for (const n of order) {
      const run = runs[n.run];
      const pos = n.index - run.nodes[0].index;
      if (run.nodes.length > RUN_FOLD && pos === 2) frag.append(this.toggle(n.run));
      const row = this.row(n);
      this.rowOf.set(n.node, row);
      frag.append(row);
    }
    this.rowsEl.replaceChildren(frag);
    this.applyFolds();
    this.selected = null;
    if (keep && this.tree.byNode.has(keep)) this.select(this.tree.byNode.get(keep), false);
    this.redraw();
  }

  row(n) {
    const r = n.row;
    const row = el('div', 'row');
    row.dataset.itemId = r.id;
    row.dataset.node = n.node;
    row.style.setProperty('--lane', n.lane);
    if (this.tree.onHead.has(n.node)) row.classList.add('on-head');
    if (n.node === this.headNode) row.classList.add('is-head');
    const card = el('div', `card kind-${r.type === 'message' ? r.role : r.type}`);
    const meta = el('div', 'meta');
    meta.append(el('span', 'role', label(r)));
    if (n.node === this.headNode) meta.append(el('span', 'head-badge', 'HEAD'));
    if (r.status && r.status !== 'completed') meta.append(el('span', 'status', r.status));
    if (n.children.length > 1) meta.append(el('span', 'fork-count', `${n.children.length} branches`));
    meta.append(el('span', 'item-id', r.id));
    let body = this.bodies.get(n.node);
    if (!body) this.bodies.set(n.node, body = itemBody(r.item));
    card.append(meta, body);
    row.append(el('span', 'dot'), card);
    return row;
  }

  toggle(runIndex) {
    const run = this.tree.runs[runIndex];
    const t = el('div', 'run-toggle');
    t.dataset.run = String(runIndex);
    t.style.setProperty('--lane', run.nodes[0].lane);
    const b = el('button', 'link');
    b.type = 'button';
    t.append(b);
    this.toggles.set(runIndex, t);
    return t;
  }

  applyFolds() {
    for (const [i, t] of this.toggles) {
      const run = this.tree.runs[i];
      const folded = this.folded.has(i);
      const middle = run.nodes.slice(2, -2);
      for (const n of middle) this.rowOf.get(n.node).classList.toggle('folded', folded);
      t.classList.toggle('open', !folded);
      t.firstChild.textContent = folded ? `⋯ ${middle.length} more items` : `fold ${middle.length} items`;
    }
  }

  setFolded(all) {
    this.folded = new Set();
    this.unfolded = new Set();
    this.tree.runs.forEach((run, i) => {
      if (run.nodes.length <= RUN_FOLD) return;
      if (all) this.folded.add(i); else this.unfolded.add(run.nodes[0].node);
    });
    this.applyFolds();
  }

  click(e) {
    const toggle = e.target.closest('.run-toggle');
    if (toggle) {
      const i = Number(toggle.dataset.run);
      const first = this.tree.runs[i].nodes[0].node;
      if (this.folded.delete(i)) this.unfolded.add(first); else { this.folded.add(i); this.unfolded.delete(first); }
      this.applyFolds();
      return;
    }
    const action = e.target.closest('[data-action]');
    if (action && this.selected) {
      this.handlers.action(action.dataset.action, this.selected);
      return;
    }
    if (e.target.closest('a, button, summary, .actions')) return;
    if (String(window.getSelection()) !== '') return; // selecting text, not the row
    const row = e.target.closest('.row');
    if (row) this.select(this.tree.byNode.get(row.dataset.node));
  }

  select(n, tell = true) {
    if (this.selected) this.rowOf.get(this.selected.node)?.classList.remove('selected');
    this.selected = n;
    const row = this.rowOf.get(n.node);
    row.classList.add('selected');
    if (row.classList.contains('folded')) {
      this.folded.delete(n.run);
      this.unfolded.add(this.tree.runs[n.run].nodes[0].node);
      this.applyFolds();
    }
    row.querySelector('.card').append(this.actions(n));
    if (tell) this.handlers.select(n);
  }

  actions(n) {
    if (!this.actionBar) {
      this.actionBar = el('div', 'actions');
      for (const [name, text, title] of [
        ['head', 'Make head', 'Point the conversation at this item: the next message continues from here'],
        ['continue', 'Continue from here', 'Write the next message under this item'],
        ['fork', 'Fork here', 'A new conversation whose history ends at this item'],
      ]) {
        const b = el('button', null, text);
        b.type = 'button';
        b.dataset.action = name;
        b.title = title;
        this.actionBar.append(b);
      }
      this.actionBar.append(el('span', 'info muted'));
    }
    this.actionBar.querySelector('[data-action="head"]').disabled = n.node === this.headNode;
    this.actionBar.querySelector('.info').textContent = '';
    return this.actionBar;
  }

  info(text) {
    if (this.actionBar) this.actionBar.querySelector('.info').textContent = text;
  }

  scrollTo(node) {
    this.rowOf.get(node)?.scrollIntoView({ block: 'center' });
  }

  excerpt(node) {
    const n = this.tree.byNode.get(node);
    return n ? itemText(n.row.item).slice(0, 80) : '';
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.redraw(); });
  }

  // The edges, from where the rows are now (called again whenever their size changes).
  redraw() {
    if (!this.tree) return;
    const { order, byNode, onHead } = this.tree;
    const w = this.laneW;
    const x = (lane) => LANE_X + lane * w + w / 2;
    const ys = new Map();
    for (const [i, t] of this.toggles) {
      if (!this.folded.has(i)) continue;
      const y = t.offsetTop + t.offsetHeight / 2;
      for (const n of this.tree.runs[i].nodes.slice(2, -2)) ys.set(n.node, y);
    }
    for (const n of order) if (!ys.has(n.node)) ys.set(n.node, this.rowOf.get(n.node).offsetTop + DOT_Y);
    const paths = { plain: [], head: [], folded: [] };
    for (const n of order) {
      const p = byNode.get(n.parent);
      if (!p) continue;
      const y1 = ys.get(p.node), y2 = ys.get(n.node);
      if (y1 === y2) continue;
      const x1 = x(p.lane), x2 = x(n.lane);
      let d;
      if (x1 === x2) d = `M${x1} ${y1}V${y2}`;
      else {
        const r = Math.min(14, (y2 - y1) / 2);
        d = `M${x1} ${y1}C${x1} ${y1 + r} ${x2} ${y1} ${x2} ${y1 + r}V${y2}`;
      }
      const folded = this.rowOf.get(n.node).classList.contains('folded') || this.rowOf.get(p.node).classList.contains('folded');
      paths[folded ? 'folded' : onHead.has(n.node) ? 'head' : 'plain'].push(d);
    }
    const height = this.rowsEl.offsetHeight;
    this.svg.setAttribute('width', String(this.tree.lanes * w + 2 * LANE_X));
    this.svg.setAttribute('height', String(height));
    const out = [];
    for (const kind of ['plain', 'folded', 'head']) {
      if (!paths[kind].length) continue;
      const path = document.createElementNS(SVG, 'path');
      path.setAttribute('class', `edge ${kind}`);
      path.setAttribute('d', paths[kind].join(''));
      out.push(path);
    }
    this.svg.replaceChildren(...out);
  }
}
