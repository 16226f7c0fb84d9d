// The explorer's only way out: requests to this server's /v1/ API, with the API key the user
// kept in this browser. Paths are relative, so they go to the origin that served the page and
// nowhere else (the page's Content-Security-Policy says `connect-src 'self'` too); redirects are
// refused, so the key never follows one.

const KEY = 'branchwise.apiKey';

export function apiKey() {
  try { return localStorage.getItem(KEY) || ''; } catch { return ''; }
}

export function setApiKey(value) {
  try {
    if (value) localStorage.setItem(KEY, value);
    else localStorage.removeItem(KEY);
  } catch { /* storage disabled: the key lives as long as the page */ }
}

export class ApiError extends Error {
  constructor(status, message, code = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

export class Unauthorized extends ApiError {}

function headers(json) {
  const h = { Accept: json ? 'application/json' : 'text/event-stream' };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function checkPath(path) {
  if (!path.startsWith('/v1/')) throw new Error(`not an API path: ${path}`);
}

async function failure(res) {
  let message = `${res.status} ${res.statusText}`, code = null, param = null;
  try {
    const body = await res.json();
    if (body && body.error) ({ message = message, code = null, param = null } = body.error);
  } catch { /* not JSON */ }
  if (res.status === 401) {
    window.dispatchEvent(new CustomEvent('branchwise:unauthorized', { detail: message }));
    return new Unauthorized(401, message, code, param);
  }
  return new ApiError(res.status, message, code, param);
}

async function send(path, { method = 'GET', body, signal, json = true } = {}) {
  checkPath(path);
  const h = headers(json);
  if (body !== undefined) h['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method, headers: h, signal, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin', cache: 'no-store', redirect: 'error',
  });
  if (!res.ok) throw await failure(res);
  return res;
}

export async function get(path, params) {
  const qs = params ? `?${new URLSearchParams(params)}` : '';
  return (await send(path + qs)).json();
}

export async function post(path, body) {
  return (await send(path, { method: 'POST', body })).json();
}

// Every row of a conversation's tree, page after page, with each item and its node ids.
export async function wholeTree(conversationId, { pageSize = 1000, most = 100_000 } = {}) {
  const base = `/v1/conversations/${encodeURIComponent(conversationId)}/tree`;
  const rows = [];
  let after = null, page;
  do {
    const params = new URLSearchParams({ limit: String(pageSize) });
    params.append('include', 'item');
    params.append('include', 'node');
    if (after) params.set('after', after);
    page = await get(`${base}?${params}`);
    rows.push(...page.data);
    after = page.last_id;
  } while (page.has_more && rows.length < most);
  return { head: page.head, headNode: page.head_node, rows, truncated: page.has_more };
}

// POST a streaming request and call `onEvent(event)` for each Server-Sent Event's data as it
// arrives. Resolves when the stream ends.
export async function stream(path, body, onEvent, signal) {
  const res = await send(path, { method: 'POST', body, signal, json: false });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart());
      if (data.length) onEvent(JSON.parse(data.join('\n')));
    }
  }
}
