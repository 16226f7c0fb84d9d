// The explorer's entry: routes on the client (/ is the list, /conversations/{id} a
// conversation), keeps the API key, and asks for one when the server answers 401.

import { apiKey, setApiKey } from './api.js';
import { showConversation } from './conversation.js';
import { showList } from './list.js';

const view = document.getElementById('view');
const banner = document.getElementById('banner');
const dialog = document.getElementById('key-dialog');
const keyInput = document.getElementById('key-input');
const keyButton = document.getElementById('key-button');

function navigate(url) {
  history.pushState(null, '', url);
  route();
}

async function route() {
  banner.hidden = true;
  const m = location.pathname.match(/^\/conversations\/([^/]+)\/?$/);
  try {
    if (m) await showConversation(view, decodeURIComponent(m[1]), { navigate });
    else await showList(view, { navigate });
  } finally {
    document.body.dataset.ready = 'true';
  }
}

function showKeyState() {
  keyButton.textContent = apiKey() ? 'API key ✓' : 'API key';
}

function openKeyDialog(reason) {
  document.getElementById('key-reason').textContent = reason || '';
  keyInput.value = apiKey();
  if (!dialog.open) dialog.showModal();
  keyInput.focus();
}

document.addEventListener('click', (e) => {
  const a = e.target.closest('a[data-link]');
  if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  e.preventDefault();
  navigate(a.getAttribute('href'));
});
window.addEventListener('popstate', route);

window.addEventListener('branchwise:unauthorized', (e) => {
  const text = apiKey() ? 'The server refused the API key kept in this browser.' : 'This server asks for an API key.';
  banner.replaceChildren(text + ' ');
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = 'Enter the API key';
  b.addEventListener('click', () => openKeyDialog(text));
  banner.append(b);
  banner.hidden = false;
  openKeyDialog(`${text} (${e.detail})`);
});

keyButton.addEventListener('click', () => openKeyDialog(''));
document.getElementById('key-save').addEventListener('click', () => {
  setApiKey(keyInput.value.trim());
  dialog.close();
  showKeyState();
  route();
});
document.getElementById('key-clear').addEventListener('click', () => {
  setApiKey('');
  keyInput.value = '';
  dialog.close();
  showKeyState();
  route();
});
document.getElementById('key-cancel').addEventListener('click', () => dialog.close());
keyInput.addEventListener('keydown', (e) => {
  if (e.key === 'Enter') { e.preventDefault(); document.getElementById('key-save').click(); }
});

showKeyState();
route();
