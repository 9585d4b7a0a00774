// gradsvc /ui: sessions, a live loss curve, steps with the chain rule shown, training jobs.
// No framework and no build step: fetch, a <canvas>, sessionStorage. Text reaches the page
// only through textContent (never innerHTML), and the CSP allows no inline script or style.

import { drawGraph } from './graph.js';

const BASE = new URL('.', location.href); // the service's root, behind whatever prefix
const POLL_MS = 750; // history, while the page is visible
const SESSION_MS = 2000; // the session itself (step, params, job), at most this often
const LIST_MS = 5000; // the sessions list
const MAX_BACKOFF_MS = 8000;
const PAGE = 500; // the API's largest page
const LIST_PAGE = 50;
const KEY_ITEM = 'gradsvc.ui.key';
const EXPLAIN_ITEM = (id) => `gradsvc.ui.explain.${id}`;
const SESSION_ID = /^s_[A-Za-z0-9_-]{1,62}$/;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- small helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const storage = {
  get(name) {
    try { return sessionStorage.getItem(name); } catch { return null; }
  },
  set(name, value) {
    try { sessionStorage.setItem(name, value); return true; } catch { return false; }
  },
  remove(name) {
    try { sessionStorage.removeItem(name); } catch { /* storage off: nothing kept */ }
  },
};

// Numbers as the notebook writes them: -1, 1.1, 1.62 (six significant digits), with a true
// minus sign. Integers stay whole.
function fmt(v) {
  if (v === null || v === undefined) return '–';
  if (typeof v !== 'number') return String(v);
  if (!Number.isFinite(v)) return String(v);
  const text = Number.isInteger(v) && Math.abs(v) < 1e15 ? String(v) : String(Number(v.toPrecision(6)));
  return text.replaceAll('-', '−');
}

// A factor in a product: negative ones in parentheses, except the first.
const factor = (v, first) => (v < 0 && !first ? `(${fmt(v)})` : fmt(v));

// ---------------------------------------------------------------- tensors, as the API sends them

function tensor(v) {
  if (typeof v === 'number') return { shape: [], data: [v] };
  if (Array.isArray(v)) {
    const shape = [];
    for (let a = v; Array.isArray(a); a = a[0]) shape.push(a.length);
    return { shape, data: v.flat(Infinity) };
  }
  if (v && typeof v === 'object' && Array.isArray(v.shape) && Array.isArray(v.data)) {
    return { shape: v.shape, data: v.data };
  }
  return null; // b64: the page never asks for it
}

const numel = (shape) => shape.reduce((a, b) => a * b, 1);

function fmtTensor(v, max = 8) {
  const t = tensor(v);
  if (!t) return '(binary)';
  if (t.data.length === 1) return fmt(t.data[0]);
  const shown = t.data.slice(0, max).map((x) => fmt(x)).join(', ');
  const more = t.data.length > max ? ', …' : '';
  const shape = t.shape.length > 1 ? ` (${t.shape.join('×')})` : '';
  return `[${shown}${more}]${shape}`;
}

// numpy broadcasting, just enough for the chain rule along a trace.
function broadcastShape(a, b) {
  const n = Math.max(a.length, b.length);
  const out = [];
  for (let i = 0; i < n; i++) {
    const x = a[a.length - n + i] ?? 1;
    const y = b[b.length - n + i] ?? 1;
    if (x !== y && x !== 1 && y !== 1) return null;
    out.push(Math.max(x, y));
  }
  return out;
}

function sourceIndex(flat, outShape, srcShape) {
  let index = 0;
  let stride = 1;
  let rest = flat;
  for (let i = outShape.length - 1, j = srcShape.length - 1; i >= 0; i--, j--) {
    const coord = rest % outShape[i];
    rest = Math.floor(rest / outShape[i]);
    if (j >= 0) {
      if (srcShape[j] !== 1) index += coord * stride;
      stride *= srcShape[j];
    }
  }
  return index;
}

function multiply(a, b) {
  const shape = broadcastShape(a.shape, b.shape);
  if (!shape) return null;
  const data = new Array(numel(shape));
  for (let k = 0; k < data.length; k++) {
    data[k] = a.data[sourceIndex(k, shape, a.shape)] * b.data[sourceIndex(k, shape, b.shape)];
  }
  return { shape, data };
}

// The gradient of a broadcast input: sum over the dimensions it was broadcast along.
function reduceTo(t, shape) {
  if (numel(t.shape) === numel(shape)) return { shape, data: t.data };
  const joint = broadcastShape(shape, t.shape);
  if (!joint || joint.length !== t.shape.length || joint.some((d, i) => d !== t.shape[i])) return null;
  const data = new Array(numel(shape)).fill(0);
  for (let k = 0; k < t.data.length; k++) data[sourceIndex(k, t.shape, shape)] += t.data[k];
  return { shape, data };
}

const add = (a, b) => (a ? { shape: a.shape, data: a.data.map((x, i) => x + b.data[i]) } : b);

function close(a, b) {
  if (!a || !b || a.data.length !== b.data.length) return false;
  return a.data.every((x, i) => Math.abs(x - b.data[i]) <= 1e-9 + 1e-6 * Math.abs(b.data[i]));
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem?.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || { title: `HTTP ${status}`, detail: '' };
    this.retryAfter = retryAfter;
  }
}

const state = { key: storage.get(KEY_ITEM) || '' };

function headers(extra = {}) {
  const h = { accept: 'application/json', ...extra };
  if (state.key) h.authorization = `Bearer ${state.key}`;
  return h;
}

async function failure(response) {
  let problem = null;
  try { problem = JSON.parse(await response.text()); } catch { /* not JSON: keep the status */ }
  if (!problem || typeof problem !== 'object') problem = { title: response.statusText || `HTTP ${response.status}`, detail: '' };
  const retry = Number(response.headers.get('retry-after'));
  return new ApiError(response.status, problem, Number.isFinite(retry) ? retry : undefined);
}

async function api(path, { method = 'GET', body, signal } = {}) {
  const init = { method, headers: headers(), signal, cache: 'no-store' };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(new URL(path, BASE), init);
  if (!response.ok) throw await failure(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

const aborted = (e) => e?.name === 'AbortError';

function showProblem(node, error) {
  if (!error) {
    node.hidden = true;
    node.replaceChildren();
    return;
  }
  let title = 'Something went wrong';
  let detail = String(error.message || error);
  let errors = [];
  if (error instanceof ApiError) {
    title = error.problem.title || `HTTP ${error.status}`;
    detail = error.problem.detail || '';
    errors = Array.isArray(error.problem.errors) ? error.problem.errors : [];
  } else if (error instanceof TypeError) {
    title = 'The service did not answer';
  }
  // One error is the detail already; several are listed.
  const list = errors.length > 1
    ? el('ul', {}, errors.slice(0, 5).map((e) => el('li', {}, `${(e.loc || []).join('.')}: ${e.msg}`)))
    : null;
  node.replaceChildren(...[el('strong', {}, title), detail, list].filter(Boolean));
  node.hidden = false;
}

// ---------------------------------------------------------------- describing a session

function modelText(m) {
  if (!m || typeof m !== 'object') return String(m);
  let text;
  if (m.type === 'expression') text = `expression  ${m.expression}`;
  else if (m.type === 'linear') text = `linear ${m.in_features} → ${m.out_features}${m.bias === false ? ', no bias' : ''}`;
  else if (m.type === 'sequential') {
    const layer = (l) => (l.type === 'linear' ? `linear(${l.in_features}→${l.out_features})` : l.type);
    text = `sequential: ${(m.layers || []).map(layer).join(' → ')}`;
  } else text = m.type;
  if (m.dtype) text += `  (${m.dtype})`;
  if (Array.isArray(m.frozen) && m.frozen.length) text += `; frozen: ${m.frozen.join(', ')}`;
  return text;
}

function optionsText(spec) {
  if (typeof spec === 'string') return spec;
  if (!spec || typeof spec !== 'object') return String(spec);
  const rest = Object.entries(spec).filter(([k]) => k !== 'type');
  return [spec.type, ...rest.map(([k, v]) => `${k} ${typeof v === 'object' ? JSON.stringify(v) : v}`)].join(', ');
}

function renderSession(s) {
  const name = s.name || 'unnamed session';
  $('s-name').textContent = name;
  $('s-id').textContent = s.id;
  document.title = `${name} · gradsvc`;
  const rows = [
    ['model', modelText(s.model)],
    ['loss', optionsText(s.loss)],
    ['optimizer', optionsText(s.optimizer)],
    ['device', s.device],
    ['step', fmt(s.step)],
    ['job', s.job || 'none'],
    ['updated', s.updated_at],
  ];
  $('s-summary').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  renderParams(s.params);
  list.update(s);
}

function renderParams(params) {
  const body = $('params').tBodies[0];
  body.replaceChildren(
    ...Object.entries(params || {}).map(([name, value]) => {
      const t = tensor(value);
      const shape = t ? (t.shape.length ? t.shape.join('×') : 'scalar') : '';
      return el('tr', {}, el('th', { scope: 'row' }, name), el('td', {}, shape), el('td', { class: 'mono' }, fmtTensor(value)));
    }),
  );
}

// ---------------------------------------------------------------- the loss curve

class Curve {
  constructor(canvas, caption, logToggle) {
    this.canvas = canvas;
    this.caption = caption;
    this.logToggle = logToggle;
    this.clear();
    this.pending = false;
    new ResizeObserver(() => this.schedule()).observe(canvas);
    logToggle.addEventListener('change', () => this.schedule());
    matchMedia('(prefers-color-scheme: dark)').addEventListener('change', () => this.schedule());
  }

  clear() {
    this.steps = [];
    this.losses = [];
    this.lowest = Infinity;
    this.lowestPositive = Infinity;
    this.schedule();
  }

  get size() { return this.steps.length; }

  // One point per session step, whichever source (history, a job's event, a step) told us.
  add(step, loss) {
    if (!Number.isFinite(step) || !Number.isFinite(loss)) return;
    this.lowest = Math.min(this.lowest, loss);
    if (loss > 0) this.lowestPositive = Math.min(this.lowestPositive, loss);
    const { steps } = this;
    if (!steps.length || step > steps[steps.length - 1]) {
      steps.push(step);
      this.losses.push(loss);
    } else {
      let lo = 0;
      let hi = steps.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (steps[mid] < step) lo = mid + 1; else hi = mid;
      }
      if (steps[lo] === step) this.losses[lo] = loss;
      else {
        steps.splice(lo, 0, step);
        this.losses.splice(lo, 0, loss);
      }
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  describe() {
    const n = this.size;
    this.canvas.dataset.points = String(n);
    if (!n) {
      this.caption.textContent = 'No steps yet.';
      this.canvas.setAttribute('aria-label', 'Loss curve: no steps yet');
      return;
    }
    const last = this.losses[n - 1];
    const min = this.lowest;
    const range = n === 1 ? `step ${this.steps[0]}` : `steps ${this.steps[0]}–${this.steps[n - 1]}`;
    const text = `${n} point${n === 1 ? '' : 's'} (${range}); last loss ${fmt(last)}; lowest ${fmt(min)}.`;
    this.caption.textContent = text;
    this.canvas.setAttribute('aria-label', `Loss curve: ${text}`);
  }

  draw() {
    this.describe();
    const { canvas } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const font = `12px ${getComputedStyle(document.body).fontFamily}`;
    ctx.clearRect(0, 0, width, height);
    ctx.font = font;

    const n = this.size;
    const log = this.logToggle.checked;
    const value = (loss) => (log ? Math.log10(Math.max(loss, this.floor)) : loss);
    // On the log scale a loss of exactly 0 is drawn at the lowest positive one.
    this.floor = Number.isFinite(this.lowestPositive) ? this.lowestPositive : 1e-12;
    let lo = Infinity;
    let hi = -Infinity;
    for (const loss of this.losses) {
      const v = value(loss);
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    if (!n) { lo = 0; hi = 1; }
    if (!log) lo = Math.min(lo, 0);
    if (hi - lo < 1e-12) { hi += log ? 0.5 : Math.max(1, Math.abs(hi)) * 0.5; lo -= log ? 0.5 : 0; }
    // Round ticks: 1, 2 or 5 times a power of ten apart (powers of ten on the log scale).
    const raw = (hi - lo) / 4;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const unit = log ? Math.max(1, Math.ceil(raw)) : magnitude * [1, 2, 5, 10].find((m) => m * magnitude >= raw);
    lo = Math.floor(lo / unit + 1e-9) * unit;
    hi = Math.ceil(hi / unit - 1e-9) * unit;
    const ticks = [];
    for (let v = lo; v <= hi + unit / 2; v += unit) ticks.push(v);

    const left = 60;
    const right = 12;
    const top = 10;
    const bottom = 24;
    const plotW = Math.max(10, width - left - right);
    const plotH = Math.max(10, height - top - bottom);
    const first = n ? this.steps[0] : 0;
    const last = n ? this.steps[n - 1] : 1;
    const span = Math.max(1, last - first);
    const x = (step) => left + ((step - first) / span) * plotW;
    const y = (v) => top + plotH - ((v - lo) / (hi - lo)) * plotH;

    // Grid and labels.
    ctx.strokeStyle = color('--grid');
    ctx.fillStyle = color('--muted');
    ctx.lineWidth = 1;
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    for (const v of ticks) {
      const py = Math.round(y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, py);
      ctx.lineTo(left + plotW, py);
      ctx.stroke();
      ctx.fillText(axisLabel(v, log), left - 6, py);
    }
    ctx.textBaseline = 'top';
    ctx.textAlign = 'left';
    ctx.fillText(n ? `step ${first}` : 'step', left, top + plotH + 6);
    ctx.textAlign = 'right';
    if (n) ctx.fillText(`step ${last}`, left + plotW, top + plotH + 6);
    if (!n) return;

    // The curve: a polyline, or one min–max bar per pixel column when points outnumber pixels.
    ctx.strokeStyle = color('--curve');
    ctx.fillStyle = color('--curve');
    ctx.lineWidth = 2;
    ctx.lineJoin = 'round';
    ctx.beginPath();
    if (n <= plotW) {
      for (let i = 0; i < n; i++) {
        const px = x(this.steps[i]);
        const py = y(value(this.losses[i]));
        if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      }
    } else {
      let column = -1;
      let cmin = 0;
      let cmax = 0;
      const flush = () => {
        if (column < 0) return;
        ctx.moveTo(column + 0.5, y(cmax));
        ctx.lineTo(column + 0.5, y(cmin) + 0.5);
      };
      for (let i = 0; i < n; i++) {
        const c = Math.floor(x(this.steps[i]));
        const v = value(this.losses[i]);
        if (c !== column) {
          flush();
          column = c;
          cmin = v;
          cmax = v;
        } else {
          cmin = Math.min(cmin, v);
          cmax = Math.max(cmax, v);
        }
      }
      flush();
      ctx.lineWidth = 1.5;
    }
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(x(last), y(value(this.losses[n - 1])), 3.5, 0, 2 * Math.PI);
    ctx.fill();
  }
}

// Short tick labels: 0.5, 20, 1e−6 (log ticks are powers of ten).
function axisLabel(v, log) {
  if (log) {
    const k = Math.round(v);
    return Math.abs(k) <= 3 ? fmt(Number((10 ** k).toPrecision(1))) : `1e${fmt(k)}`;
  }
  const a = Math.abs(v);
  if (a < 1e-12) return '0';
  return fmt(a < 1e-3 || a >= 1e5 ? Number(v.toExponential(1)) : Number(v.toPrecision(3)));
}

// ---------------------------------------------------------------- the derivation of a step

// The label a node gets in d/d(...) notation: the model's output is ŷ, as in the notebook.
function label(name, output) {
  if (name === output) return 'ŷ';
  return /^[A-Za-z_][\w.]*$/.test(name) ? name : `(${name})`;
}
const d = (of, wrt, output) => `d${label(of, output)}/d${label(wrt, output)}`;

// A local derivative in symbols, where it is one name: d(w * x)/dw = x.
function symbolic(node, input) {
  const [a, b] = node.inputs || [];
  return node.op === 'mul' && a !== b ? `${input === a ? b : a} = ` : '';
}

function lossLines(lossNode, yhat, target, output, lossSpec) {
  const type = typeof lossSpec === 'string' ? lossSpec : lossSpec?.type || lossNode.op;
  const reduction = (typeof lossSpec === 'object' && lossSpec?.reduction) || 'mean';
  const p = tensor(yhat.value);
  const t = target ? tensor(target.value) : null;
  const g = tensor(yhat.grad);
  const n = p ? p.data.length : 0;
  const lines = [];
  const one = n === 1 && t && t.data.length === 1;
  if (type === 'squared' || type === 'mse') {
    const half = type === 'squared' ? '½' : '';
    const two = type === 'squared' ? '' : '2';
    if (one) {
      const [a, b] = [p.data[0], t.data[0]];
      lines.push(`L = ${half}(ŷ − y)² = ${half}(${fmt(a)} − ${factor(b, false)})² = ${fmt(lossNode.value)}`);
      const diff = two ? `2(ŷ − y) = 2(${fmt(a)} − ${factor(b, false)})` : `ŷ − y = ${fmt(a)} − ${factor(b, false)}`;
      lines.push(`dL/dŷ = ${diff} = ${fmt(g.data[0])}`);
    } else {
      const mean = reduction === 'mean' ? `1/${n} ` : '';
      const over = reduction === 'mean' ? `/${n}` : '';
      lines.push(`L = ${mean}Σᵢ ${half}(ŷᵢ − yᵢ)² = ${fmt(lossNode.value)}`);
      lines.push(`dL/dŷᵢ = ${two}(ŷᵢ − yᵢ)${over} = ${fmtTensor(yhat.grad)}`);
    }
  } else {
    lines.push(`L = ${type}(ŷ, y) = ${fmt(lossNode.value)}`);
    lines.push(`dL/dŷ = ${fmtTensor(yhat.grad)}`);
  }
  return lines;
}

// Every way from a parameter up to ŷ through nodes whose local derivatives the trace gives.
function paths(param, output, nodes) {
  const consumers = new Map();
  for (const node of nodes) {
    for (const input of node.inputs || []) {
      if (!consumers.has(input)) consumers.set(input, []);
      consumers.get(input).push(node);
    }
  }
  const found = [];
  let opaque = false;
  const walk = (name, trail) => {
    if (found.length > 16) return;
    if (name === output) { found.push(trail); return; }
    for (const c of consumers.get(name) || []) {
      if (c.op === 'target' || c === nodes[nodes.length - 1]) continue;
      if (!c.local || !(name in c.local)) { opaque = true; continue; }
      walk(c.node, [...trail, { from: name, to: c.node, local: tensor(c.local[name]) }]);
    }
  };
  walk(param, []);
  return { found, opaque };
}

function chainLines(param, output, nodes, byName, grad) {
  const yhat = byName.get(output);
  const { found, opaque } = paths(param, output, nodes);
  const expected = tensor(grad);
  const pshape = tensor(byName.get(param)?.value)?.shape ?? expected?.shape ?? [];
  if (!found.length || opaque) {
    return [`dL/d${label(param, output)} = ${fmtTensor(grad)}  (through an operation that is not elementwise; autograd's value)`];
  }
  const dLdy = tensor(yhat.grad);
  const lines = [];
  let total = null;
  const terms = [];
  let scalar = dLdy.data.length === 1 && found.length === 1;
  for (const trail of found) {
    // Backwards along the trail: from dL/dŷ down to the parameter, summing over broadcasts.
    let g = dLdy;
    for (let i = trail.length - 1; i >= 0 && g; i--) {
      const edge = trail[i];
      const below = i ? tensor(byName.get(trail[i - 1].to)?.value)?.shape : pshape;
      const product = multiply(g, edge.local);
      g = product && below ? reduceTo(product, below) : null;
      if (edge.local.data.length !== 1) scalar = false;
    }
    if (!g) return [`dL/d${label(param, output)} = ${fmtTensor(grad)}  (autograd's value)`];
    total = add(total, g);
    terms.push({ trail, g });
  }
  const p = label(param, output);
  const agrees = close(total, expected) ? '  ✓ autograd agrees' : `  (autograd: ${fmtTensor(grad)})`;
  const show = (t) => (t.data.length === 1 ? fmt(t.data[0]) : fmtTensor(t.shape.length ? nest(t) : t.data[0]));
  if (scalar) {
    // The notebook's form: dL/dw = dL/dŷ · dŷ/dw, with dŷ/dw itself a product of locals.
    const { trail } = terms[0];
    const locals = trail.map((e) => e.local.data[0]).reverse();
    const dydp = locals.reduce((a, b) => a * b, 1);
    if (trail.length > 1) {
      const names = trail.map((e) => d(e.to, e.from, output)).reverse();
      lines.push(`dŷ/d${p} = ${names.join(' · ')} = ${locals.map((v, i) => factor(v, i === 0)).join(' · ')} = ${fmt(dydp)}`);
    } else if (trail.length === 1) {
      lines.push(`dŷ/d${p} = ${fmt(dydp)}`);
    }
    lines.push(`dL/d${p} = dL/dŷ · dŷ/d${p} = ${factor(dLdy.data[0], true)} · ${factor(dydp, false)} = ${show(total)}${agrees}`);
    return lines;
  }
  for (const { trail, g } of terms) {
    const names = ['dL/dŷ', ...trail.map((e) => d(e.to, e.from, output)).reverse()];
    const sum = g.data.length < numel(dLdy.shape) ? 'Σ ' : '';
    const via = terms.length > 1 ? `via ${trail.map((e) => label(e.to, output)).join(' → ') || 'ŷ'}: ` : `dL/d${p} = `;
    lines.push(`${via}${sum}${names.join(' · ')} = ${show(g)}`);
  }
  if (terms.length > 1) {
    const sum = terms.map((t, i) => (t.g.data.length === 1 ? factor(t.g.data[0], i === 0) : show(t.g))).join(' + ');
    lines.push(`dL/d${p} = ${sum} = ${show(total)}${agrees}`);
  }
  else lines[lines.length - 1] += agrees;
  return lines;
}

function nest({ shape, data }) {
  if (shape.length <= 1) return data;
  const size = numel(shape.slice(1));
  const out = [];
  for (let i = 0; i < shape[0]; i++) out.push(nest({ shape: shape.slice(1), data: data.slice(i * size, (i + 1) * size) }));
  return out;
}

function updateLines(name, before, after, grad, optimizer) {
  const param = label(name, null);
  const o = typeof optimizer === 'object' && optimizer ? optimizer : {};
  const plain = o.type === 'sgd' && !o.momentum && !o.weight_decay && !o.clip_grad_norm && !o.maximize;
  const b = tensor(before);
  const a = tensor(after);
  const g = tensor(grad);
  if (plain && b && g && b.data.length === 1 && g.data.length === 1 && typeof o.lr === 'number') {
    return `${param} ← ${param} − lr · dL/d${param} = ${fmt(b.data[0])} − ${fmt(o.lr)} · ${factor(g.data[0], false)} = ${fmt(a?.data[0])}`;
  }
  return `${param}: ${fmtTensor(before)} → ${fmtTensor(after)}  (${o.type || 'optimizer'} step)`;
}

// The trace as a graph, scrolled sideways when it is wider than the panel, or fitted to it.
function graphFigure(trace) {
  const picture = drawGraph(trace);
  if (!picture) return null;
  const frame = el('div', { class: 'graph-frame', id: 'graph' });
  frame.append(picture);
  const fit = el('input', { type: 'checkbox', id: 'graph-fit' });
  fit.addEventListener('change', () => frame.classList.toggle('fit', fit.checked));
  return el('figure', { class: 'graph-figure' },
    frame,
    el('figcaption', { class: 'hint' },
      'Left to right, the forward pass: each box a node with its value and dL/dnode, each edge an input labelled with its local derivative. ',
      'Backward, dL/dnode is the sum over the edges out of a node of the next box\'s dL/dnode times the edge\'s label. ',
      el('label', { class: 'inline', for: 'graph-fit' }, fit, 'fit to width')));
}

function renderDerivation(saved) {
  renderSamples(saved?.samples ?? null);
  const section = $('derivation');
  const body = $('derivation-body');
  if (!saved || !Array.isArray(saved.trace) || !saved.trace.length) {
    section.hidden = true;
    body.replaceChildren();
    return;
  }
  const nodes = saved.trace;
  const lossNode = nodes[nodes.length - 1];
  const output = lossNode.inputs?.[0];
  const byName = new Map();
  for (const node of nodes) byName.set(node.node, node);
  const yhat = byName.get(output);
  const target = byName.get(lossNode.inputs?.[1]);

  const batch = saved.batch ? `x = ${JSON.stringify(saved.batch.x)}, y = ${JSON.stringify(saved.batch.y)}` : '';
  const rows = nodes.map((node) => {
    const locals = Object.entries(node.local || {}).map(
      ([input, v]) => `${d(node.node, input, output)} = ${symbolic(node, input)}${fmtTensor(v)}`,
    );
    const name = node.node === output ? `ŷ = ${node.node}` : node.node === lossNode.node ? 'L' : node.node;
    return el(
      'tr', {},
      el('th', { scope: 'row', class: 'mono' }, name),
      el('td', {}, node.op),
      el('td', { class: 'mono' }, fmtTensor(node.value)),
      el('td', { class: 'mono' }, node.grad === null || node.grad === undefined ? '–' : fmtTensor(node.grad)),
      el('td', { class: 'mono' }, locals.join('; ') || '–'),
    );
  });
  const table = el(
    'div', { class: 'scroll' },
    el('table', {},
      el('caption', { class: 'hint' }, 'Every node of the computation, in evaluation order'),
      el('thead', {}, el('tr', {}, ['node', 'op', 'value', 'dL/dnode', 'local derivatives'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows)),
  );
  const list = (lines, attrs = () => ({})) => el('ol', {}, lines.map((line, i) => el('li', { class: 'eq', ...attrs(i) }, line)));

  const parts = [
    el('p', {}, `Step ${saved.step}`, batch ? ` on ${batch}` : '', `: loss ${fmt(saved.loss)}.`),
    el('h4', {}, 'Forward and backward'),
    graphFigure(nodes),
    table,
  ];
  if (yhat) {
    parts.push(el('h4', {}, 'The loss'), list(lossLines(lossNode, yhat, target, output, saved.lossSpec)));
    parts.push(el('h4', {}, 'The chain rule, for each parameter'));
    for (const [param, grad] of Object.entries(saved.grads || {})) {
      const lines = chainLines(param, output, nodes, byName, grad);
      parts.push(el('ol', { 'data-param': param }, lines.map((line) => el('li', { class: 'eq' }, line))));
    }
    const before = (name) => byName.get(name)?.value;
    const updates = Object.keys(saved.grads || {}).map((name) =>
      updateLines(name, before(name), saved.params?.[name], saved.grads[name], saved.optimizer));
    if (saved.params) parts.push(el('h4', {}, 'The update'), list(updates));
  }
  body.replaceChildren(el('div', { class: 'derivation' }, parts));
  section.hidden = false;
}

// ---------------------------------------------------------------- which sample pulls hardest

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// What the page keeps of a step's quantities: each sample's gradient norm, the square root of
// per_sample_l2 summed over the parameters, and each parameter's signal-to-noise ratio,
// |mean gₙ| / std gₙ elementwise, with mean gₙ = grads / N and the variance as answered.
function sampleSummary(grads, quantities) {
  const l2 = Object.values(quantities?.per_sample_l2 || {}).map(tensor).filter(Boolean);
  if (!l2.length) return null;
  const n = l2[0].data.length;
  const norms = Array.from({ length: n }, (_, i) => Math.sqrt(l2.reduce((sum, t) => sum + t.data[i], 0)));
  const snr = {};
  for (const [name, v] of Object.entries(quantities.variance || {})) {
    const variance = tensor(v);
    const g = tensor(grads?.[name]);
    if (!variance || !g) continue;
    snr[name] = variance.data.map((s, i) => (s > 0 ? Math.abs(g.data[i] / n) / Math.sqrt(s) : null));
  }
  return { norms, snr };
}

function renderSamples(summary) {
  const section = $('samples');
  const chart = $('samples-chart');
  if (!summary || !summary.norms.length) {
    section.hidden = true;
    chart.replaceChildren();
    return;
  }
  const { norms, snr } = summary;
  const width = 320;
  const height = 120;
  const gap = 4;
  const top = Math.max(...norms) || 1;
  const bar = Math.max(2, (width - gap * (norms.length + 1)) / norms.length);
  const hardest = norms.indexOf(Math.max(...norms));
  const bars = norms.map((norm, i) => {
    const h = Math.max(1, (norm / top) * (height - 16));
    return svg('rect', {
      class: i === hardest ? 'bar hardest' : 'bar',
      x: gap + i * (bar + gap),
      y: height - h,
      width: bar,
      height: h,
      'data-sample': i,
    }, svg('title', {}, `sample ${i}: ‖gₙ‖ = ${fmt(norm)}`));
  });
  const picture = svg('svg', {
    viewBox: `0 0 ${width} ${height}`,
    role: 'img',
    'data-samples': norms.length,
    'aria-label': `Per-sample gradient norms of ${norms.length} samples; sample ${hardest} pulls hardest (${fmt(norms[hardest])})`,
  }, bars);
  const rows = Object.entries(snr).map(([name, values]) => el('tr', {},
    el('th', { scope: 'row', class: 'mono' }, name),
    el('td', { class: 'mono' }, fmtTensor(values.map((v) => (v === null ? '∞' : v))))));
  chart.replaceChildren(
    picture,
    el('p', { class: 'hint' }, `Sample ${hardest} pulls hardest: ‖g${hardest}‖ = ${fmt(norms[hardest])}.`),
    rows.length ? el('div', { class: 'scroll' }, el('table', {},
      el('caption', { class: 'hint' }, 'Signal-to-noise of the gradient, |mean gₙ| / std gₙ, per element'),
      el('thead', {}, el('tr', {}, ['parameter', 'signal / noise'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows))) : null,
  );
  section.hidden = false;
}

// The step's quantities, at the parameters the step starts from: a session's gradients
// change nothing. A model they cannot be computed for simply shows none.
async function stepQuantities(id, batch) {
  try {
    const answer = await api(`v1/sessions/${encodeURIComponent(id)}/gradients`, {
      method: 'POST',
      body: { batch, quantities: ['per_sample_l2', 'variance'] },
    });
    return sampleSummary(answer.grads, answer.quantities);
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- the sessions list

const list = {
  items: new Map(), // id → <li>
  next: null, // cursor for "Load more"
  tail: null, // the cursor that fetched the last page: re-read to find new sessions
  selected: null,

  queue: Promise.resolve(),

  // Loads run one after another, so that a click on Refresh is never lost behind a poll.
  load(reset) {
    this.queue = this.queue.then(() => this.fetch(reset));
    return this.queue;
  },

  async fetch(reset) {
    this.loading = true;
    try {
      const cursor = reset ? null : this.tail;
      const page = await api(`v1/sessions?limit=${LIST_PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
      if (reset) {
        this.items.clear();
        $('session-list').replaceChildren();
        this.tail = null;
      }
      this.merge(page.items);
      this.next = page.next;
      showProblem($('sessions-error'), null);
    } catch (e) {
      if (!aborted(e)) showProblem($('sessions-error'), e);
    } finally {
      this.loading = false;
      this.render();
    }
  },

  more() {
    this.queue = this.queue.then(() => this.fetchMore());
    return this.queue;
  },

  async fetchMore() {
    if (!this.next) return;
    this.loading = true;
    try {
      const cursor = this.next;
      const page = await api(`v1/sessions?limit=${LIST_PAGE}&cursor=${encodeURIComponent(cursor)}`);
      this.tail = cursor;
      this.merge(page.items);
      this.next = page.next;
      showProblem($('sessions-error'), null);
    } catch (e) {
      showProblem($('sessions-error'), e);
    } finally {
      this.loading = false;
      this.render();
    }
  },

  merge(items) {
    for (const s of items) this.update(s, true);
  },

  update(s, add = false) {
    let item = this.items.get(s.id);
    if (!item) {
      if (!add) return;
      const link = el('a', { href: `#${s.id}` }, el('span', { class: 'name' }), el('span', { class: 'meta' }));
      item = el('li', { 'data-session': s.id }, link);
      this.items.set(s.id, item);
      $('session-list').append(item);
    }
    const link = item.firstChild;
    link.children[0].textContent = s.name || 'unnamed session';
    link.children[1].textContent = `step ${s.step}${s.job ? ' · training' : ''} · ${s.id}`;
    if (s.id === this.selected) link.setAttribute('aria-current', 'true');
  },

  select(id) {
    this.selected = id;
    for (const [sid, item] of this.items) {
      if (sid === id) item.firstChild.setAttribute('aria-current', 'true');
      else item.firstChild.removeAttribute('aria-current');
    }
  },

  render() {
    $('more').hidden = !this.next;
    $('sessions-empty').hidden = this.items.size > 0 || !$('sessions-error').hidden;
  },
};

// ---------------------------------------------------------------- the selected session, live

const curve = new Curve($('curve'), $('curve-caption'), $('log-scale'));

class Watch {
  constructor(id, focus) {
    this.id = id;
    this.focus = focus; // move the focus to the session once it shows (a user's choice)
    this.alive = true;
    this.timer = null;
    this.cursor = null; // the last page boundary the API gave us
    this.known = 0; // rows already read after that boundary
    this.lastStep = 0;
    this.sessionAt = 0;
    this.failures = 0;
    this.job = null; // the job being shown
    this.stream = null; // its event stream's AbortController
    this.following = null;
    this.noEvents = new Set(); // jobs this replica cannot report on: history only
  }

  start() {
    this.tick();
  }

  stop() {
    this.alive = false;
    clearTimeout(this.timer);
    this.stream?.abort();
  }

  pause() {
    clearTimeout(this.timer);
    this.timer = null;
    this.stream?.abort();
    this.stream = null;
    this.following = null;
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = null;
    if (!this.alive || document.hidden) return;
    this.timer = setTimeout(() => this.tick(), delay);
  }

  async tick() {
    if (this.ticking || !this.alive) return;
    this.ticking = true;
    clearTimeout(this.timer);
    let delay = POLL_MS;
    try {
      const grew = await this.pull();
      if (grew || !this.session || Date.now() - this.sessionAt >= SESSION_MS) await this.refresh();
      this.failures = 0;
      showProblem($('session-error'), null);
    } catch (e) {
      if (!this.alive || aborted(e)) return;
      this.failures += 1;
      showProblem($('session-error'), e);
      delay = Math.min(MAX_BACKOFF_MS, POLL_MS * 2 ** this.failures);
      if (e instanceof ApiError && e.retryAfter) delay = Math.max(delay, e.retryAfter * 1000);
      if (e instanceof ApiError && e.status === 404) delay = MAX_BACKOFF_MS;
    } finally {
      this.ticking = false;
    }
    this.schedule(delay);
  }

  async refresh() {
    const s = await api(`v1/sessions/${encodeURIComponent(this.id)}`);
    if (!this.alive) return;
    this.sessionAt = Date.now();
    const first = !this.session;
    this.session = s;
    renderSession(s);
    if (first) {
      $('nothing').hidden = true;
      $('session').hidden = false;
      if (this.focus) $('s-name').focus();
    }
    if (s.job && s.job !== this.following && !this.noEvents.has(s.job)) this.follow(s.job);
    else if (s.job && this.noEvents.has(s.job)) this.showJob({ id: s.job, status: 'running', progress: null });
    else if (!s.job && this.job && this.job.progress === null) $('job').hidden = true;
  }

  // History, oldest first, in pages with opaque `next` cursors; `next` is null at the end, so
  // to notice new rows the page re-reads the rows it has after its last boundary (asking for
  // exactly that many, the answer's `next` appears as soon as there is one more), and keeps
  // that tail short by stepping its boundary forward. Returns whether anything new came.
  async pull() {
    let grew = false;
    // At most 20 pages a tick: a long history fills in over a few ticks, under rate limits.
    for (let rounds = 0; rounds < 20 && this.alive; rounds++) {
      const limit = this.known > 0 ? this.known : PAGE;
      const cursor = this.cursor ? `&cursor=${encodeURIComponent(this.cursor)}` : '';
      const page = await api(`v1/sessions/${encodeURIComponent(this.id)}/history?limit=${limit}${cursor}`);
      if (!this.alive) return grew;
      for (const row of page.items) {
        if (row.step > this.lastStep) {
          curve.add(row.step, row.loss);
          this.lastStep = row.step;
          grew = true;
        }
      }
      if (page.next) {
        this.cursor = page.next;
        this.known = 0;
        continue;
      }
      if (this.known === 0 && page.items.length > 1) {
        // Move the boundary to just before the last row, so later checks read one row.
        this.known = page.items.length;
        const tight = await api(`v1/sessions/${encodeURIComponent(this.id)}/history?limit=${this.known - 1}${cursor}`);
        if (tight.next) {
          this.cursor = tight.next;
          this.known = 1;
        }
      } else if (this.known === 0) {
        this.known = page.items.length;
      }
      return grew;
    }
    return grew;
  }

  showJob(job) {
    if (!this.alive) return;
    this.job = job;
    $('job').hidden = false;
    const bar = $('job-progress');
    if (typeof job.progress === 'number') bar.value = job.progress;
    else bar.removeAttribute('value'); // indeterminate
    $('job-status').textContent = job.status + (job.progress === null ? ' (progress shown from the history)' : '');
    $('job-epoch').textContent = job.epochs ? `${job.epoch} of ${job.epochs}` : '–';
    $('job-steps').textContent = job.total_steps ? `${job.steps_done} of ${job.total_steps}` : '–';
    $('job-loss').textContent = fmt(job.loss);
    $('cancel').hidden = !['queued', 'running'].includes(job.status) || job.progress === null;
    showProblem($('job-error'), job.error ? new ApiError(job.error.status || 500, job.error) : null);
    if (job.id) $('job').dataset.job = job.id;
    $('job').dataset.status = job.status;
  }

  async follow(jobId) {
    if (!this.alive) return;
    this.stream?.abort();
    const control = new AbortController();
    this.stream = control;
    this.following = jobId;
    try {
      const job = await api(`v1/jobs/${encodeURIComponent(jobId)}`, { signal: control.signal });
      this.showJob(job);
      if (['succeeded', 'failed', 'cancelled'].includes(job.status)) return;
      await this.events(jobId, control.signal);
    } catch (e) {
      if (aborted(e)) return;
      if (e instanceof ApiError && (e.status === 404 || e.status === 405)) {
        // No jobs API here, or another replica's job: the history still shows it train.
        this.noEvents.add(jobId);
        this.showJob({ id: jobId, status: 'running', progress: null });
      } else {
        showProblem($('job-error'), e);
      }
    } finally {
      if (this.stream === control) {
        this.stream = null;
        if (this.following === jobId) this.following = null; // the next refresh may follow again
      }
    }
  }

  // Server-Sent Events over fetch (EventSource cannot send the Authorization header).
  async events(jobId, signal) {
    const response = await fetch(new URL(`v1/jobs/${encodeURIComponent(jobId)}/events`, BASE), {
      headers: headers({ accept: 'text/event-stream' }),
      signal,
      cache: 'no-store',
    });
    if (!response.ok) throw await failure(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
        if (this.onEvent(block)) {
          reader.cancel().catch(() => {});
          return;
        }
      }
    }
  }

  onEvent(block) {
    let type = 'message';
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (!data.length) return false;
    let job;
    try { job = JSON.parse(data.join('\n')); } catch { return false; }
    if (!this.alive) return true;
    this.showJob(job);
    if (typeof job.loss === 'number' && job.steps_done > 0) curve.add(job.step, job.loss);
    if (type === 'end') {
      this.sessionAt = 0; // read the session's final state at the next tick
      return true;
    }
    return false;
  }
}

let watch = null;

function select(id, { focus = false } = {}) {
  if (watch && watch.id === id) return;
  watch?.stop();
  list.select(id);
  curve.clear();
  $('job').hidden = true;
  $('session').hidden = true;
  $('nothing').hidden = true;
  showProblem($('session-error'), null);
  for (const node of ['step-error', 'train-error', 'job-error']) showProblem($(node), null);
  $('step-result').textContent = '';
  renderDerivation(loadDerivation(id));
  watch = new Watch(id, focus);
  watch.start();
}

function loadDerivation(id) {
  const text = storage.get(EXPLAIN_ITEM(id));
  if (!text) return null;
  try { return JSON.parse(text); } catch { return null; }
}

function route({ focus = false } = {}) {
  const id = decodeURIComponent(location.hash.slice(1));
  if (SESSION_ID.test(id)) select(id, { focus });
}

// ---------------------------------------------------------------- forms

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ApiError(422, { title: 'Invalid JSON', detail: `${what}: ${e.message}` });
  }
}

async function busy(form, work) {
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  try { await work(); } finally { button.disabled = false; }
}

$('step-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const w = watch;
  if (!w) return;
  busy(event.target, async () => {
    const error = $('step-error');
    try {
      const batch = { x: parseJson($('step-x').value, 'x'), y: parseJson($('step-y').value, 'y') };
      const explain = $('step-explain').checked;
      const samples = explain ? await stepQuantities(w.id, batch) : null;
      const answer = await api(`v1/sessions/${encodeURIComponent(w.id)}/step`, {
        method: 'POST',
        body: { batch, explain },
      });
      let saved = null;
      if (explain && answer.trace) {
        saved = {
          step: answer.step,
          batch,
          loss: answer.loss,
          grads: answer.grads,
          params: answer.params,
          trace: answer.trace,
          lossSpec: w.session?.loss,
          optimizer: w.session?.optimizer,
          samples,
        };
        storage.set(EXPLAIN_ITEM(w.id), JSON.stringify(saved));
      }
      if (w !== watch) return; // another session was picked meanwhile
      showProblem(error, null);
      curve.add(answer.step, answer.loss);
      $('step-result').textContent = `step ${answer.step}: loss ${fmt(answer.loss)}, ‖∇‖ ${fmt(answer.grad_norm)}`;
      if (answer.params) renderParams(answer.params);
      if (saved) renderDerivation(saved);
      w.sessionAt = 0;
    } catch (e) {
      if (w === watch) showProblem(error, e);
    }
  });
});

$('train-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const w = watch;
  if (!w) return;
  busy(event.target, async () => {
    const error = $('train-error');
    try {
      const body = {
        dataset: parseJson($('train-dataset').value, 'dataset'),
        epochs: Number($('train-epochs').value),
        batch_size: Number($('train-batch').value),
        shuffle: $('train-shuffle').checked,
      };
      const job = await api(`v1/sessions/${encodeURIComponent(w.id)}/train`, { method: 'POST', body });
      showProblem(error, null);
      w.showJob(job);
      w.follow(job.id);
      w.sessionAt = 0;
    } catch (e) {
      showProblem(error, e);
    }
  });
});

$('cancel').addEventListener('click', async () => {
  const w = watch;
  if (!w?.job?.id) return;
  const button = $('cancel');
  button.disabled = true;
  try {
    w.showJob(await api(`v1/jobs/${encodeURIComponent(w.job.id)}`, { method: 'DELETE' }));
    w.sessionAt = 0;
  } catch (e) {
    showProblem($('job-error'), e);
  } finally {
    button.disabled = false;
  }
});

$('key-form').addEventListener('submit', (event) => {
  event.preventDefault();
  state.key = $('api-key').value.trim();
  if (state.key) storage.set(KEY_ITEM, state.key); else storage.remove(KEY_ITEM);
  list.load(true);
  if (watch) {
    const { id } = watch;
    watch.stop();
    watch = null;
    select(id);
  }
});

$('refresh').addEventListener('click', () => list.load(true));
$('more').addEventListener('click', () => list.more());

// The skip link must not be taken for a session id.
document.querySelector('.skip').addEventListener('click', (event) => {
  event.preventDefault();
  $('main').focus();
});

window.addEventListener('hashchange', () => route({ focus: true }));

document.addEventListener('visibilitychange', () => {
  if (document.hidden) {
    watch?.pause();
  } else {
    list.load(false);
    if (watch) watch.tick();
  }
});

// ---------------------------------------------------------------- start

$('api-key').value = state.key;
list.load(true);
route();
setInterval(() => {
  if (!document.hidden) list.load(false);
}, LIST_MS);
