// moera's web page: streamed chat (optionally grounded in a document collection) and a
// training-progress view. Plain JS, no dependencies; talks to the server it was served from.
'use strict';

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = 'moera.apiKey';

const els = {
  key: $('api-key'), model: $('model'), status: $('status'),
  chatForm: $('chat-form'), question: $('question'), collection: $('collection'),
  send: $('send'), stop: $('stop'), answer: $('answer'), usage: $('usage'), sources: $('sources'),
  trainForm: $('train-form'), trainId: $('train-id'), progress: $('train-progress'),
  trainSummary: $('train-summary'), trainLog: $('train-log'),
};

function apiKey() {
  return els.key.value.trim();
}

function setStatus(text) {
  els.status.textContent = text;
}

function askForKey(text) {
  setStatus(text);
  els.key.focus();
}

// Browsers cannot set headers on a WebSocket, so the key travels as ?api_key=.
function wsUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = new URL(path, `${scheme}//${location.host}`);
  if (apiKey()) url.searchParams.set('api_key', apiKey());
  return url.href;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  if (apiKey()) headers.set('Authorization', `Bearer ${apiKey()}`);
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body?.error?.message || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- models ----

async function loadModels() {
  try {
    const list = await api('/v1/models');
    const previous = els.model.value;
    els.model.replaceChildren();
    for (const m of list.data || []) {
      if (m.kind === 'embedding') continue; // an embedder cannot answer
      const option = new Option(m.parent ? `${m.id} (adapter of ${m.parent})` : m.id, m.id);
      els.model.append(option);
    }
    if ([...els.model.options].some((o) => o.value === previous)) els.model.value = previous;
    setStatus(`${els.model.options.length} model(s) available.`);
  } catch (e) {
    if (e.status === 401) askForKey('This server needs an API key.');
    else setStatus(`Could not list the models: ${e.message}`);
  }
}

els.key.value = localStorage.getItem(KEY_STORAGE) || '';
els.key.addEventListener('change', () => {
  localStorage.setItem(KEY_STORAGE, apiKey());
  loadModels();
});

// ---- chat ----

let chatSocket = null;

function setAnswerState(state) {
  els.answer.dataset.state = state;
  els.answer.setAttribute('aria-busy', String(state === 'streaming'));
  const busy = state === 'connecting' || state === 'streaming';
  els.send.disabled = busy;
  els.stop.disabled = !busy;
}

function showSources(sources) {
  els.sources.replaceChildren();
  for (const s of sources || []) {
    const item = document.createElement('li');
    if (typeof s === 'string') {
      item.textContent = s;
    } else {
      const title = document.createElement('strong');
      title.textContent = s.title || s.source || `passage ${s.id}`;
      item.append(title);
      const score = s.rerank_score ?? s.similarity;
      const where = [s.source, s.chunk !== undefined ? `chunk ${s.chunk}` : null,
        typeof score === 'number' ? `score ${score.toFixed(3)}` : null].filter(Boolean);
      if (where.length) item.append(` — ${where.join(', ')}`);
      if (s.text) {
        const details = document.createElement('details');
        const summary = document.createElement('summary');
        summary.textContent = 'Passage';
        const text = document.createElement('p');
        text.textContent = s.text;
        details.append(summary, text);
        item.append(details);
      }
    }
    els.sources.append(item);
  }
}

function fail(message) {
  setAnswerState('error');
  setStatus(message);
}

function ask(event) {
  event.preventDefault();
  const question = els.question.value.trim();
  if (!question || chatSocket) return;

  const request = { messages: [{ role: 'user', content: question }] };
  if (els.model.value) request.model = els.model.value;
  const collection = els.collection.value.trim();
  if (collection) request.collection = collection;

  els.answer.replaceChildren();
  els.usage.textContent = '';
  showSources([]);
  setAnswerState('connecting');
  setStatus('Connecting…');

  const socket = new WebSocket(wsUrl('/ws/stream'));
  chatSocket = socket;
  let finished = false;
  socket.onopen = () => socket.send(JSON.stringify(request));
  socket.onmessage = (message) => {
    let m;
    try {
      m = JSON.parse(message.data);
    } catch {
      return;
    }
    if (m.type === 'start') {
      setAnswerState('streaming');
      setStatus(`Generating with ${m.model || 'the model'} (${m.prompt_tokens ?? '?'} prompt tokens)…`);
      if (m.sources?.length) showSources(m.sources);
    } else if (m.type === 'token') {
      // A text node per piece: the text grows as it streams, never re-rendered.
      els.answer.append(m.text);
    } else if (m.type === 'done') {
      finished = true;
      if (m.sources) showSources(m.sources);
      const u = m.usage;
      if (u) els.usage.textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} generated tokens`;
      setAnswerState('done');
      setStatus(`Done (${m.finish_reason}).`);
    } else if (m.type === 'error') {
      finished = true;
      if (m.status === 401) askForKey(`The server refused the API key: ${m.message}`);
      fail(`Error ${m.status ?? ''}: ${m.message}`);
    }
  };
  socket.onclose = (close) => {
    if (chatSocket === socket) chatSocket = null;
    if (finished) return;
    if (els.answer.dataset.state === 'stopped') {
      setAnswerState('stopped');
      return;
    }
    // A refused handshake (401, 404) only shows as a close without a reason.
    fail(close.reason ? `Connection closed: ${close.reason}` :
      'Connection closed before the answer finished (is the API key right?).');
  };
}

els.chatForm.addEventListener('submit', ask);
els.question.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) els.chatForm.requestSubmit();
});
els.stop.addEventListener('click', () => {
  if (!chatSocket) return;
  setAnswerState('stopped'); // closing the socket cancels the generation on the server
  setStatus('Stopped.');
  chatSocket.close();
});

// ---- training progress ----

let trainSocket = null;

function logLine(text) {
  els.trainLog.append(`${text}\n`);
  els.trainLog.scrollTop = els.trainLog.scrollHeight;
}

function duration(seconds) {
  if (!Number.isFinite(seconds)) return '?';
  const s = Math.round(seconds);
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function showEvent(e) {
  switch (e.event) {
    case 'started':
      els.progress.max = Math.max(e.total_steps, 1);
      els.progress.value = 0;
      logLine(`started: ${e.total_steps} steps, ${e.train_examples} examples, ` +
        `${e.trainable_parameters} trainable parameters`);
      break;
    case 'step': {
      els.progress.max = Math.max(e.total_steps, 1);
      els.progress.value = e.step;
      const line = `step ${e.step}/${e.total_steps}  loss ${e.loss.toFixed(4)}  ` +
        `${Math.round(e.tokens_per_second)} tokens/s  ETA ${duration(e.eta_seconds)}`;
      els.trainSummary.textContent = line;
      logLine(line);
      break;
    }
    case 'eval':
      logLine(`eval at step ${e.step}: loss ${e.loss.toFixed(4)}`);
      break;
    case 'checkpoint_saved':
      logLine(`checkpoint at step ${e.step}: ${e.path}`);
      break;
    case 'finished':
      els.progress.value = els.progress.max;
      els.trainSummary.textContent =
        `Finished: ${e.steps} steps, loss ${e.loss.toFixed(4)}, ${duration(e.seconds)}.`;
      logLine(`finished: ${e.steps} steps, loss ${e.loss.toFixed(4)} in ${duration(e.seconds)}`);
      break;
    case 'failed':
      els.trainSummary.textContent = `Failed at step ${e.step}: ${e.error}`;
      logLine(`failed at step ${e.step}: ${e.error}`);
      break;
    default:
      if (e.type === 'error') {
        els.trainSummary.textContent = `Error ${e.status ?? ''}: ${e.message}`;
        logLine(`error: ${e.message}`);
      } else {
        logLine(JSON.stringify(e));
      }
  }
}

els.trainForm.addEventListener('submit', (event) => {
  event.preventDefault();
  const id = els.trainId.value.trim();
  if (!id) return;
  if (trainSocket) trainSocket.close();
  els.trainLog.replaceChildren();
  els.progress.value = 0;
  els.trainSummary.textContent = `Watching ${id}…`;
  const socket = new WebSocket(wsUrl(`/ws/train/${encodeURIComponent(id)}`));
  trainSocket = socket;
  socket.onmessage = (message) => {
    try {
      showEvent(JSON.parse(message.data));
    } catch {
      logLine(String(message.data));
    }
  };
  socket.onclose = () => {
    if (trainSocket === socket) trainSocket = null;
    logLine('(stream closed)');
  };
});

loadModels();
