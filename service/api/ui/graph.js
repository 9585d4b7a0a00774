// An explained step's trace drawn as its computation graph, in plain SVG: one rounded box per
// node (its name and op, its value, dL/dnode), one edge per input labelled with the local
// derivative, laid out in layers from the leaves (inputs, parameters) on the left to the loss
// on the right. Colours come from the page's CSS (classes only: the CSP allows no inline
// style), and every text reaches the SVG as a text node.

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ---------------------------------------------------------------- compact numbers

// Four significant digits and a true minus sign: a box is read at a glance; its <title> has
// more.
function num(v, digits = 4) {
  if (typeof v !== 'number') return String(v);
  if (!Number.isFinite(v)) return String(v);
  let text;
  if (Number.isInteger(v) && Math.abs(v) < 1e6) text = String(v);
  else if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) text = v.toExponential(digits - 2).replace('e+', 'e');
  else text = String(Number(v.toPrecision(digits)));
  return text.replaceAll('-', '−');
}

function flat(v) {
  if (typeof v === 'number') return { shape: [], data: [v] };
  if (Array.isArray(v)) {
    const shape = [];
    for (let a = v; Array.isArray(a); a = a[0]) shape.push(a.length);
    return { shape, data: v.flat(Infinity) };
  }
  if (v && typeof v === 'object' && Array.isArray(v.shape) && Array.isArray(v.data)) return v;
  return null;
}

// A scalar as itself; a tensor as its shape and its first few values: "2×3 [1, 2, 3, …]".
function compact(v, shown = 3, digits = 4) {
  if (v === null || v === undefined) return '–';
  const t = flat(v);
  if (!t) return '(binary)';
  if (t.data.length === 1) return num(t.data[0], digits);
  const values = t.data.slice(0, shown).map((x) => num(x, digits)).join(', ');
  const more = t.data.length > shown ? ', …' : '';
  return `${t.shape.join('×')} [${values}${more}]`;
}

const truncate = (text, max) => (text.length > max ? `${text.slice(0, max - 1)}…` : text);

// ---------------------------------------------------------------- the graph

// The trace's nodes, plus a node for every input it names without listing (a constant such as
// the 1 in w * x + 1), each with its inputs and consumers.
function build(trace, output, lossName) {
  const nodes = new Map();
  const add = (name, data) => {
    nodes.set(name, { name, order: nodes.size, inputs: [], consumers: [], ...data });
  };
  for (const t of trace) add(t.node, { op: t.op, value: t.value, grad: t.grad, local: t.local, listed: true });
  for (const t of trace) {
    for (const input of t.inputs || []) {
      if (!nodes.has(input)) {
        const constant = /^-?\d+(\.\d*)?(e-?\d+)?$/i.test(input);
        add(input, { op: constant ? 'const' : 'leaf', value: constant ? Number(input) : null, grad: null, listed: false });
      }
    }
  }
  const edges = [];
  for (const t of trace) {
    const to = nodes.get(t.node);
    for (const input of t.inputs || []) {
      const from = nodes.get(input);
      const edge = { from, to, local: t.local && input in t.local ? t.local[input] : undefined };
      // The loss's own derivative is dL/dŷ, which the trace gives as ŷ's grad (dL/dL = 1).
      if (edge.local === undefined && t.node === lossName && input === output) edge.local = from.grad;
      edges.push(edge);
      from.consumers.push(edge);
      to.inputs.push(edge);
    }
  }
  for (const n of nodes.values()) {
    n.kind = n.name === lossName ? 'loss' : n.name === output ? 'output'
      : ['input', 'param', 'target', 'const'].includes(n.op) ? n.op : n.inputs.length ? 'op' : 'leaf';
  }
  return { nodes: [...nodes.values()], edges };
}

// Layers by depth from the leaves (a node one right of its deepest input), then every leaf
// pulled right to just before its first consumer, so that a constant or the target sits next
// to what uses it rather than in the first column.
function layer(nodes) {
  for (const n of nodes) n.layer = 0;
  for (const n of nodes) { // the trace is in evaluation order: inputs come first
    for (const e of n.inputs) n.layer = Math.max(n.layer, e.from.layer + 1);
  }
  for (const n of nodes) {
    if (!n.inputs.length && n.consumers.length) n.layer = Math.min(...n.consumers.map((e) => e.to.layer)) - 1;
  }
  const count = Math.max(0, ...nodes.map((n) => n.layer)) + 1;
  const layers = Array.from({ length: count }, () => []);
  for (const n of nodes) layers[n.layer].push(n);
  return layers;
}

// A node's place in its column, centred: comparable across columns of different sizes.
const place = (n, layers) => n.index - (layers[n.layer].length - 1) / 2;

function crossings(edges, layers) {
  let total = 0;
  for (let i = 0; i < edges.length; i++) {
    const a = edges[i];
    for (let j = i + 1; j < edges.length; j++) {
      const b = edges[j];
      const lo = Math.max(a.from.layer, b.from.layer);
      const hi = Math.min(a.to.layer, b.to.layer);
      if (lo >= hi) continue;
      // Straight lines between centred places, compared at both ends of the shared span.
      const at = (e, l) => {
        const y0 = place(e.from, layers);
        const y1 = place(e.to, layers);
        return y0 + ((y1 - y0) * (l - e.from.layer)) / (e.to.layer - e.from.layer);
      };
      const s = at(a, lo) - at(b, lo);
      const t = at(a, hi) - at(b, hi);
      if (s * t < 0) total += 1;
    }
  }
  return total;
}

// Barycentre sweeps, right then left, ties kept in trace order; the ordering with the fewest
// crossings wins. Deterministic: the same trace is always drawn the same way.
function order(layers, edges) {
  const index = () => layers.forEach((column) => column.forEach((n, i) => { n.index = i; }));
  index();
  let best = layers.map((column) => [...column]);
  let fewest = crossings(edges, layers);
  for (let sweep = 0; sweep < 8 && fewest > 0; sweep++) {
    const forward = sweep % 2 === 0;
    const range = forward ? layers.map((_, i) => i) : layers.map((_, i) => layers.length - 1 - i);
    for (const l of range) {
      const column = layers[l];
      const key = new Map();
      for (const n of column) {
        const near = forward ? n.inputs.map((e) => e.from) : n.consumers.map((e) => e.to);
        key.set(n, near.length ? near.reduce((s, m) => s + place(m, layers), 0) / near.length : place(n, layers));
      }
      column.sort((a, b) => key.get(a) - key.get(b) || a.order - b.order);
      column.forEach((n, i) => { n.index = i; });
    }
    const count = crossings(edges, layers);
    if (count < fewest) {
      fewest = count;
      best = layers.map((column) => [...column]);
    }
  }
  best.forEach((column, l) => { layers[l] = column; });
  index();
  return fewest;
}

// Heights: each box as near the middle of its neighbours as the boxes above it allow (in its
// column's order), sweeping right, left, then right again, so that a chain reads as a line.
function straighten(layers) {
  const centre = (m) => m.y + BOX_H / 2;
  const settle = (column, wanted) => {
    let floor = -Infinity;
    for (const n of column) { // top down: no overlap, order kept
      n.y = Math.max(wanted.get(n), floor);
      floor = n.y + BOX_H + ROW_GAP;
    }
    // Then the whole column moves to sit, on average, where it was wanted.
    const shift = column.reduce((sum, n) => sum + wanted.get(n) - n.y, 0) / column.length;
    for (const n of column) n.y += shift;
  };
  for (const forward of [true, false, true]) {
    const range = forward ? layers.map((_, i) => i) : layers.map((_, i) => layers.length - 1 - i);
    for (const l of range) {
      const column = layers[l];
      const wanted = new Map();
      for (const n of column) {
        const near = forward && n.inputs.length ? n.inputs.map((e) => e.from)
          : n.consumers.length ? n.consumers.map((e) => e.to) : n.inputs.map((e) => e.from);
        wanted.set(n, near.length ? near.reduce((sum, m) => sum + centre(m), 0) / near.length - BOX_H / 2 : n.y);
      }
      settle(column, wanted);
    }
  }
}

// What a box says: a heading (ŷ and L named as in the notebook), the op, the value, dL/dnode.
function describe(n, labels) {
  const short = labels.get(n.name);
  const heading = n.kind === 'output' ? `ŷ = ${n.name}` : n.kind === 'loss' ? 'L' : n.name;
  const wrt = short || (/^[A-Za-z_][\w.]{0,9}$/.test(n.name) ? n.name : n.name.length <= 9 ? `(${n.name})` : 'node');
  const noGrad = n.grad === null || n.grad === undefined;
  return {
    heading: truncate(heading, 28),
    op: n.op,
    value: truncate(`${short || 'value'} = ${compact(n.value, 2)}`, 34),
    grad: truncate(noGrad ? 'no gradient' : `dL/d${wrt} = ${compact(n.grad, 2)}`, 34),
    title: `${heading} (${n.op}): value ${compact(n.value, 8, 6)}; `
      + (noGrad ? 'no gradient' : `dL/d${short || `(${n.name})`} = ${compact(n.grad, 8, 6)}`),
  };
}

// A local derivative in words where it is one name, as the table writes it: d(w * x)/dw = x.
function edgeText(e) {
  if (e.local === undefined || e.local === null) return null;
  const ins = e.to.inputs.map((i) => i.from.name);
  const symbol = e.to.op === 'mul' && ins.length === 2 && ins[0] !== ins[1]
    ? (ins[0] === e.from.name ? ins[1] : ins[0]) : '';
  const t = flat(e.local);
  if (!t) return symbol || null;
  // A tensor is the symbol alone, or one number where every element is the same (an add's 1).
  if (t.data.length === 1 || t.data.every((v) => v === t.data[0])) {
    const value = num(t.data[0], 3);
    return symbol ? `${symbol} = ${value}` : value;
  }
  return symbol || `[${num(t.data[0], 3)}, …]`; // the shape is the box's own
}

// d(w * x)/dw, dL/dŷ: names that are not one symbol in parentheses.
function derivative(e, labels) {
  const symbol = (n) => labels.get(n.name) || (/^[A-Za-z_][\w.]*$/.test(n.name) ? n.name : `(${n.name})`);
  return `d${symbol(e.to)}/d${symbol(e.from)}`;
}

const CHAR = 7.2; // px per character of the 12px monospace font the boxes use
const LINE = 16;
const PAD = 8;
const BOX_H = PAD * 2 + LINE * 3;
const ROW_GAP = 16;
const COL_GAP = 96;
const MARGIN = 12;

/**
 * The computation graph of an explained step, as an `<svg role="img">`.
 *
 * @param {object[]} trace the answer's `trace`, in evaluation order, ending with the loss.
 * @returns {SVGSVGElement|null} the drawing, or null for an empty trace.
 */
export function drawGraph(trace) {
  if (!Array.isArray(trace) || !trace.length) return null;
  const lossNode = trace[trace.length - 1];
  const output = lossNode.inputs?.[0];
  const labels = new Map([[output, 'ŷ'], [lossNode.node, 'L']]);
  const { nodes, edges } = build(trace, output, lossNode.node);
  const layers = layer(nodes);
  order(layers, edges);

  // A column is as wide as its widest box.
  const text = new Map(nodes.map((n) => [n, describe(n, labels)]));
  const widths = layers.map((column) => Math.max(96, ...column.map((n) => {
    const t = text.get(n);
    const head = t.heading.length + t.op.length + 2;
    return PAD * 2 + CHAR * Math.max(head, t.value.length, t.grad.length);
  })));
  let x = MARGIN;
  layers.forEach((column, l) => {
    column.forEach((n, i) => {
      n.x = x;
      n.w = widths[l];
      n.y = i * (BOX_H + ROW_GAP);
    });
    x += widths[l] + COL_GAP;
  });
  const width = x - COL_GAP + MARGIN;
  straighten(layers);
  const top = Math.min(...nodes.map((n) => n.y));
  for (const n of nodes) n.y += MARGIN - top;
  const height = Math.max(...nodes.map((n) => n.y)) + BOX_H + MARGIN;

  // Edges first, under the boxes; where several meet a box they arrive spread out, in the
  // order of their sources, so that they do not cross at the box.
  const drawnEdges = [];
  const labelsDrawn = [];
  const pending = [];
  for (const n of nodes) {
    const incoming = [...n.inputs].sort((a, b) => a.from.y - b.from.y || a.from.order - b.from.order);
    incoming.forEach((e, k) => {
      const x0 = e.from.x + e.from.w;
      const y0 = e.from.y + BOX_H / 2;
      const x1 = n.x;
      const y1 = n.y + BOX_H / 2 + (k - (incoming.length - 1) / 2) * Math.min(14, (BOX_H - 12) / Math.max(1, incoming.length - 1));
      const bend = Math.max(30, (x1 - x0) / 2);
      const d = `M${x0},${y0} C${x0 + bend},${y0} ${x1 - bend},${y1} ${x1},${y1}`;
      const words = edgeText(e);
      const title = `${e.from.name} → ${e.to.name}: `
        + (words ? `${derivative(e, labels)} = ${compact(e.local, 8, 6)}`
          : e.from.kind === 'target' ? 'the target (nothing is differentiated with respect to it)'
            : 'not elementwise (the trace gives no local derivative)');
      const path = svg('path', {
        class: words ? 'edge' : 'edge opaque',
        d,
        'marker-end': 'url(#graph-arrow)',
        'data-from': e.from.name,
        'data-to': e.to.name,
      }, svg('title', {}, title));
      drawnEdges.push(path);
      if (words) {
        // Ending just before the arrow, on the curve (a cubic Bézier near t = 0.9), pushed
        // apart below where labels crowd.
        const t = 0.9;
        const u = 1 - t;
        const lx = u ** 3 * x0 + 3 * u * u * t * (x0 + bend) + 3 * u * t * t * (x1 - bend) + t ** 3 * x1;
        const ly = u ** 3 * y0 + 3 * u * u * t * y0 + 3 * u * t * t * y1 + t ** 3 * y1;
        pending.push({ e, words, title, x: Math.min(lx, x1 - 14), y: ly - 4 });
      }
    });
  }
  // Labels in one gap between columns, top to bottom, at least a line apart.
  const gaps = new Map();
  for (const p of pending) {
    const key = p.e.to.layer;
    if (!gaps.has(key)) gaps.set(key, []);
    gaps.get(key).push(p);
  }
  for (const group of gaps.values()) {
    group.sort((a, b) => a.y - b.y);
    for (let i = 1; i < group.length; i++) {
      const [a, b] = [group[i - 1], group[i]];
      if (Math.abs(a.x - b.x) < CHAR * 10 && b.y - a.y < 12) b.y = a.y + 12;
    }
  }
  for (const p of pending) {
    labelsDrawn.push(svg('g', {}, svg('title', {}, p.title), svg('text', {
      class: 'edge-label',
      x: p.x,
      y: p.y,
      'text-anchor': 'end',
      'data-from': p.e.from.name,
      'data-to': p.e.to.name,
    }, truncate(p.words, 14))));
  }

  const boxes = nodes.map((n) => {
    const t = text.get(n);
    return svg('g', {
      class: `node ${n.kind}`,
      transform: `translate(${n.x},${n.y})`,
      'data-node': n.name,
      'data-layer': n.layer,
      'data-x': Math.round(n.x),
    },
    svg('title', {}, t.title),
    svg('rect', { width: n.w, height: BOX_H, rx: 8, ry: 8 }),
    svg('text', { class: 'heading', x: PAD, y: PAD + 12 }, t.heading),
    svg('text', { class: 'op', x: n.w - PAD, y: PAD + 12, 'text-anchor': 'end' }, t.op),
    svg('text', { class: 'value', x: PAD, y: PAD + 12 + LINE }, t.value),
    svg('text', { class: 'grad', x: PAD, y: PAD + 12 + LINE * 2 }, t.grad));
  });

  const leaves = nodes.filter((n) => !n.inputs.length && n.kind !== 'target' && n.kind !== 'const').map((n) => labels.get(n.name) || n.name);
  const marker = svg('marker', {
    id: 'graph-arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse',
  }, svg('path', { class: 'arrow', d: 'M0,0 L10,5 L0,10 z' }));
  return svg('svg', {
    class: 'graph',
    width: Math.ceil(width),
    height: Math.ceil(height),
    viewBox: `0 0 ${Math.ceil(width)} ${Math.ceil(height)}`,
    role: 'img',
    'data-nodes': nodes.length,
    'data-edges': edges.length,
    'aria-label': `The step's computation graph: ${nodes.length} nodes and ${edges.length} edges, from ${truncate(leaves.join(', '), 80)} on the left to the loss L = ${compact(lossNode.value)} on the right; each box shows a value and dL/dnode, each edge its local derivative.`,
  }, svg('defs', {}, marker), svg('g', { class: 'edges' }, drawnEdges), svg('g', { class: 'nodes' }, boxes), svg('g', { class: 'edge-labels' }, labelsDrawn));
}
