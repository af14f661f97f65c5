// Drives moera's web page in headless Chromium (the distribution's /usr/bin/chromium):
// enter the API key, ask a question, watch the answer stream in over /ws/stream, save a
// screenshot. Prints a JSON summary; exits non-zero on any failure or page console error.
//
//   node page_test.mjs URL API_KEY OUTDIR      (API_KEY may be "" for a server without a key)
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const QUESTION = 'Hello there';
const ANSWER_TIMEOUT_MS = 60_000;

const [url, apiKey, outDir] = process.argv.slice(2);
if (!url || apiKey === undefined || !outDir) {
  console.error('usage: node page_test.mjs URL API_KEY OUTDIR');
  process.exit(2);
}

const started = Date.now();
const summary = { ok: false, url, question: QUESTION };
const consoleErrors = [];
// Before the key is entered the page's first /v1/models call may be refused (401), which
// Chromium reports as a console error; that one is expected, anything else is not.
let phase = 'before-key';

function check(condition, message) {
  if (!condition) throw new Error(message);
}

await mkdir(outDir, { recursive: true });
const userDataDir = await mkdtemp(path.join(tmpdir(), 'moera-chromium-'));
let context;
let page;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1000, height: 900 },
  });
  page = context.pages()[0] ?? await context.newPage();
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    const text = message.text();
    const expected = phase === 'before-key' && /status of 401/.test(text);
    if (!expected) consoleErrors.push({ phase, text });
  });
  page.on('pageerror', (error) => consoleErrors.push({ phase, text: `uncaught: ${error.message}` }));

  await page.goto(url, { waitUntil: 'load' });
  const key = page.locator('#api-key');
  await key.fill(apiKey);
  await key.dispatchEvent('change');

  // The key survives a reload (localStorage), and with it the model list loads.
  phase = 'with-key';
  await page.reload({ waitUntil: 'load' });
  check(await key.inputValue() === apiKey, 'the API key was not kept in localStorage');
  await page.waitForFunction(() => document.querySelector('#model').options.length > 0 ||
    document.querySelector('#status').textContent !== '', null, { timeout: 15_000 });
  const models = await page.locator('#model option').count();
  check(models > 0, `no model listed: ${await page.locator('#status').textContent()}`);
  summary.models = await page.locator('#model option').evaluateAll((os) => os.map((o) => o.value));

  // Every change of the answer's text while it is not done yet: the page must show it growing.
  await page.evaluate(() => {
    const answer = document.querySelector('#answer');
    window.__observed = [];
    new MutationObserver(() => {
      window.__observed.push({ length: answer.textContent.length, state: answer.dataset.state });
    }).observe(answer, {
      childList: true, characterData: true, subtree: true, attributes: true,
      attributeFilter: ['data-state'],
    });
  });

  await page.locator('#question').pressSequentially(QUESTION);
  const asked = Date.now();
  await page.locator('#send').click();
  await page.waitForSelector('#answer[data-state=done], #answer[data-state=error]',
    { timeout: ANSWER_TIMEOUT_MS });
  summary.answer_seconds = (Date.now() - asked) / 1000;
  summary.state = await page.locator('#answer').getAttribute('data-state');
  summary.status = await page.locator('#status').textContent();
  check(summary.state === 'done', `the answer ended in state ${summary.state}: ${summary.status}`);

  const text = await page.locator('#answer').textContent();
  summary.answer = text;
  summary.answer_length = text.length;
  summary.sources = await page.locator('#sources li').count();
  summary.usage = await page.locator('#usage').textContent();
  check(text.trim().length > 0, 'the answer is empty');

  const observed = await page.evaluate(() => window.__observed);
  const streamed = new Set(observed.filter((o) => o.state !== 'done' && o.length > 0)
    .map((o) => o.length));
  summary.observations = observed.length;
  summary.distinct_lengths_before_done = streamed.size;
  check(streamed.size >= 2,
    `the answer did not stream: ${streamed.size} distinct non-empty length(s) before done`);

  await page.screenshot({ path: path.join(outDir, 'page.png'), fullPage: true });
  summary.screenshot = path.join(outDir, 'page.png');
  check(consoleErrors.length === 0, 'the page logged console errors');
  summary.ok = true;
} catch (error) {
  summary.error = error.message;
  if (page && !summary.screenshot) {
    const failure = path.join(outDir, 'page-failure.png');
    await page.screenshot({ path: failure, fullPage: true }).catch(() => {});
    summary.screenshot = failure;
  }
} finally {
  summary.console_errors = consoleErrors;
  summary.seconds = (Date.now() - started) / 1000;
  await context?.close().catch(() => {});
  await rm(userDataDir, { recursive: true, force: true });
}

console.log(JSON.stringify(summary, null, 2));
process.exit(summary.ok ? 0 : 1);
