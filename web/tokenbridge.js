// TokenBridge in the browser: deploy.py's OnnxSampler on ONNX Runtime Web, step for step, and
// pictures of it decoding (as tools/watch.py draws them). The graphs are export.py's, unchanged.
import * as ort from "./node_modules/onnxruntime-web/dist/ort.min.mjs";

const EXPORT_FORMAT = 3;                  // deploy.EXPORT_FORMAT: the graphs' interface version
const TINT = [60, 80, 130], UNKNOWN_SHADE = 0.7;   // tools/watch.py: unknown positions, tinted
const SCALE = 4;                          // screen pixels per image pixel

// --- the model: tokenbridge.json and the three graphs ---------------------------------------

export class Model {
  static async load(folder, provider = "wasm") {
    const meta = await readMeta(folder);
    const open = async (name) => {
      try {
        return await ort.InferenceSession.create(`${folder}${name}`, {executionProviders: [provider]});
      } catch (e) {
        throw new Error(`${folder}${name} cannot be loaded by ONNX Runtime Web (${e.message}); ` +
                        "re-export the graphs and copy them again");
      }
    };
    const [backbone, head, vae] = await Promise.all(
      ["backbone.onnx", "head_step.onnx", meta.vae.file].map(open));
    return new Model(meta, backbone, head, vae);
  }

  constructor(meta, backbone, head, vae) {
    Object.assign(this, {meta, backbone, head, vae});
    const config = this.config = meta.config;
    this.stride = config.vae_stride;
    this.grid = config.image_size / this.stride;
    this.N = this.grid * this.grid;                                            // positions
    this.C = config.channels;
    const q = meta.quantizer;
    Object.assign(this, {centers: q.centers, mean: q.mean, std: q.std, order: q.order});
    this.cacheShape = [meta.head.depth, 2, 0, meta.head.heads, this.C, meta.head.head_dim];
  }

  // twin of OnnxSampler.dequantize: tokens (..., C) -> values (..., C)
  dequantize(tokens) {
    const values = new Float32Array(tokens.length);
    for (let i = 0; i < tokens.length; i++) {
      const c = i % this.C;
      values[i] = Math.fround(Math.fround(this.centers[tokens[i]] * this.std[c]) + this.mean[c]);
    }
    return values;
  }

  // twin of OnnxSampler.unpatchify: (B, N, C) -> (B, C, H, W)
  unpatchify(values, B) {
    const {N, C} = this, out = new Float32Array(values.length);
    for (let b = 0; b < B; b++)
      for (let n = 0; n < N; n++)
        for (let c = 0; c < C; c++) out[(b * C + c) * N + n] = values[(b * N + n) * C + c];
    return out;
  }

  // twin of OnnxSampler.condition_rows: the head's input, (1, M, D) mixed or (G, M, D) rows
  async conditionRows(values, mask, labels, candidates, k, guidance, mixed) {
    const rows = labels.length, B = candidates.length / k;
    const feeds = {
      values: new ort.Tensor("float32", values, [rows, this.N, this.C]),
      mask: new ort.Tensor("bool", mask, [rows, this.N]),
      labels: new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [rows]),
      candidates: new ort.Tensor("int64", BigInt64Array.from(candidates, BigInt), [B, k]),
      guidance: new ort.Tensor("float32", Float32Array.of(guidance), []),
    };
    const out = await this.backbone.run(feeds);
    return mixed ? out.mixed : out.rows;
  }

  // twin of OnnxSampler.sample_channels: tokens (M, C) in VAE channel order, scores (M,)
  async sampleChannels(cond, uniforms, temperature, guidance) {
    const [G, M] = cond.dims, C = this.C;
    const shape = [...this.cacheShape];
    shape[2] = G * M;
    const feeds = {
      cond,
      cache: new ort.Tensor("float32", new Float32Array(shape.reduce((a, b) => a * b)), shape),
      tokens: new ort.Tensor("int64", new BigInt64Array(M * C), [M, C]),
      uniforms: new ort.Tensor("float32", uniforms, [M, C]),
      temperature: new ort.Tensor("float32", Float32Array.of(temperature), []),
      guidance: new ort.Tensor("float32", Float32Array.of(guidance), []),
      score: new ort.Tensor("float32", new Float32Array(M), [M]),
    };
    for (let t = 0; t < C; t++) {  // head.step + guidance + sample_from_logits, in one graph
      feeds.step = new ort.Tensor("int64", BigInt64Array.of(BigInt(t)), []);
      const out = await this.head.run(feeds);
      Object.assign(feeds, {tokens: out.tokens_out, score: out.score_out, cache: out.cache_out});
    }
    const generated = feeds.tokens.data, tokens = new Int32Array(M * C);
    for (let m = 0; m < M; m++)
      for (let j = 0; j < C; j++) tokens[m * C + this.order[j]] = Number(generated[m * C + j]);
    return [tokens, feeds.score.data];
  }

  // twin of OnnxSampler.decode: latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]
  async decode(latents, B) {
    const tensor = new ort.Tensor("float32", latents, [B, this.C, this.grid, this.grid]);
    const out = await this.vae.run({latents: tensor});
    return out.image;
  }

  // --- the sampler: twin of OnnxSampler.sample_tokens (deploy.py), line by line --------------
  // random: {permutation(n) -> n ints, uniforms(count) -> Float32Array}, drawn in deploy.py's
  // sequence (the page's own generator, or a test's replay of numpy's draws).
  async sampleTokens(labels, {numIter = null, cfg = 1.0, temperature = 1.0, random,
                              cfgMode = "features", cfgSchedule = "linear",
                              positionOrder = "random", confidenceNoise = 1.0, onStep = null}) {
    // the arguments, refused with TokenBridge.sample_tokens' checks, in its order
    const numClasses = this.config.num_classes;
    checkLabels(labels, numClasses);
    const B = labels.length, N = this.N, C = this.C;
    numIter = numIter === null ? N : numIter;
    this.checkSampling(numIter, cfg, temperature, cfgMode, cfgSchedule, positionOrder,
                       confidenceNoise);

    // the decoding order, both guidance halves' labels, nothing known yet
    let orders = null;
    if (positionOrder === "random") orders = labels.map(() => random.permutation(N));
    const guided = cfg !== 1.0, reps = guided ? 2 : 1;
    const allLabels = guided ? [...labels, ...labels.map(() => numClasses)] : [...labels];
    const tokens = new Int32Array(B * N * C);
    const mask = new Uint8Array(B * N).fill(1);
    let masked = N;                                  // positions still unknown in every image

    const schedule = maskSchedule(N, numIter);
    for (let s = 0; s < schedule.length; s++) {
      const left = schedule[s];
      // this step's uniforms; the candidates: the next slice of each order, or every unknown
      // position, in position order
      const uniforms = random.uniforms(B * N * C);
      const k = positionOrder === "random" ? masked - left : masked;
      const candidates = new Int32Array(B * k);
      for (let b = 0; b < B; b++) {
        const picked = positionOrder === "random" ? orders[b].slice(left, masked)
          : [...Array(N).keys()].filter((n) => mask[b * N + n]);
        picked.sort((x, y) => x - y).forEach((n, j) => { candidates[b * k + j] = n; });
      }

      // the candidates conditioned on the known positions, guided
      const values = tile(this.dequantize(tokens), reps), w = guidanceWeight(
        cfg, N, left, cfgSchedule, this.config.official_compat);
      const cond = await this.conditionRows(values, tile(mask, reps), allLabels, candidates, k,
                                            w, guided && cfgMode === "features");

      // the channels of every candidate
      const logitGuidance = guided && cfgMode === "logits" ? w : 1.0;
      const rows = new Float32Array(B * k * C);
      for (let i = 0; i < B * k; i++) {
        const b = Math.floor(i / k), n = candidates[i];
        rows.set(uniforms.subarray((b * N + n) * C, (b * N + n + 1) * C), i * C);
      }
      let [fresh, score] = await this.sampleChannels(cond, rows, temperature, logitGuidance);

      // confidence order: keep the best-scored candidates, under shrinking Gumbel noise
      let chosen = candidates, kept = k;
      if (positionOrder === "confidence") {
        const noise = random.uniforms(B * N), f = Math.fround;
        const weight = f(confidenceNoise * (1 - (s + 1) / numIter));
        kept = masked - left;
        chosen = new Int32Array(B * kept);
        const picked = new Int32Array(B * kept * C);
        for (let b = 0; b < B; b++) {
          const scores = new Float32Array(N).fill(-Infinity), slotOf = new Int32Array(N);
          for (let j = 0; j < k; j++) {
            scores[candidates[b * k + j]] = score[b * k + j];
            slotOf[candidates[b * k + j]] = j;
          }
          const noisy = Array.from(scores, (x, n) => f(x + f(weight * f(-f(Math.log(
            f(-f(Math.log(noise[b * N + n])))))))));
          const best = [...noisy.keys()].sort((x, y) => noisy[y] - noisy[x] || x - y);
          best.slice(0, kept).forEach((n, j) => {
            chosen[b * kept + j] = n;
            const from = (b * k + slotOf[n]) * C;
            picked.set(fresh.subarray(from, from + C), (b * kept + j) * C);
          });
        }
        fresh = picked;
      }

      // the chosen positions become known
      for (let i = 0; i < B * kept; i++) {
        const b = Math.floor(i / kept), n = chosen[i];
        tokens.set(fresh.subarray(i * C, (i + 1) * C), (b * N + n) * C);
        mask[b * N + n] = 0;
      }
      masked = left;
      if (onStep) await onStep(s, tokens.slice(), mask.slice());
    }
    return tokens;
  }

  // twin of OnnxSampler._check_sampling: the same checks, in order, and messages
  checkSampling(numIter, cfg, temperature, cfgMode, cfgSchedule, positionOrder, confidenceNoise) {
    const refuse = (message) => { throw new Error(message); };
    if (!(Number.isInteger(numIter) && numIter >= 1 && numIter <= this.N))
      refuse(`num_iter must be in [1, ${this.N}] (one position at least per step), got ${numIter}`);
    if (!(cfg >= 0)) refuse(`cfg must be >= 0 (1 = no guidance), got ${cfg}`);
    if (!(temperature >= 0)) refuse(`temperature must be >= 0, got ${temperature}`);
    for (const [name, value, choices] of [["cfg_mode", cfgMode, ["features", "logits"]],
                                          ["cfg_schedule", cfgSchedule, ["linear", "constant"]],
                                          ["position_order", positionOrder, ["random", "confidence"]]])
      if (!choices.includes(value)) refuse(`${name} must be one of ('${choices.join("', '")}'), got '${value}'`);
    if (!(confidenceNoise >= 0)) refuse(`confidence_noise must be >= 0, got ${confidenceNoise}`);
  }
}

async function readMeta(folder) {
  const path = `${folder}tokenbridge.json`;
  let response;
  try {
    response = await fetch(path);
  } catch (e) {
    throw new Error(`cannot fetch ${path} (${e.message}); serve the page over HTTP: ` +
                    "python -m http.server --directory web");
  }
  if (!response.ok)
    throw new Error(`no ${path} (HTTP ${response.status}): export the digits model and copy its ` +
                    "graphs there (web/README.md)");
  let meta;
  try {
    meta = await response.json();
  } catch (e) {
    throw new Error(`${path} is not valid JSON (${e.message}); re-export the graphs`);
  }
  if ((meta.format ?? 1) !== EXPORT_FORMAT)
    throw new Error(`${path} is of export format ${meta.format ?? 1}; this page reads format ` +
                    `${EXPORT_FORMAT}: re-export the graphs with this repository's export.py`);
  if (!meta.vae)
    throw new Error(`${folder} holds a model without a VAE decoder (no images to draw); ` +
                    "export a run that has one, such as the digits demo");
  return meta;
}

// twin of deploy.check_labels, for a JavaScript array (its length stands for numpy's shape)
function checkLabels(labels, numClasses) {
  const top = numClasses + 1;
  const integers = Array.isArray(labels) && labels.every(Number.isInteger);
  if (!(integers && labels.length > 0))
    throw new Error("labels must be a 1-D array of integer class numbers, got " +
                    `${integers ? "integers" : "non-integers"} of shape (${labels?.length},)`);
  if (!labels.every((x) => x >= 0 && x < top))
    throw new Error(`labels must lie in [0, ${top}) for this model's ${numClasses} classes ` +
                    `(${numClasses}: unconditional), got [${labels.slice(0, 8).join(", ")}]`);
}

// twin of deploy.mask_schedule
export function maskSchedule(seqLen, numIter) {
  const left = [];
  let remaining = seqLen;
  for (let s = 0; s < numIter; s++) {
    const n = Math.floor(seqLen * Math.cos(Math.PI / 2 * (s + 1) / numIter));
    remaining = s === numIter - 1 ? 0 : Math.max(1, Math.min(remaining - 1, n));
    left.push(remaining);
  }
  return left;
}

// twin of deploy.guidance_weight
function guidanceWeight(cfg, seqLen, left, schedule, officialClamp) {
  if (schedule === "constant") return cfg;
  return 1.0 + (cfg - 1.0) * (seqLen - Math.max(left, Number(officialClamp))) / seqLen;
}

function tile(array, reps) {
  const out = new array.constructor(array.length * reps);
  for (let r = 0; r < reps; r++) out.set(array, r * array.length);
  return out;
}

// The page's own seeded generator (mulberry32): not numpy's, so its samples differ from
// sample.py's for the same seed; the sampler itself is the same (a test replays numpy's draws).
export function seededRandom(seed) {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6D2B79F5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    permutation(n) {
      const p = [...Array(n).keys()];
      for (let i = n - 1; i > 0; i--) {
        const j = Math.floor(next() * (i + 1));
        [p[i], p[j]] = [p[j], p[i]];
      }
      return p;
    },
    uniforms: (count) => Float32Array.from({length: count}, next),
  };
}

// A test's replay of numpy's draws, in deploy.py's sequence.
export function replayRandom(draws) {
  let i = 0;
  return {permutation: () => draws[i++], uniforms: () => Float32Array.from(draws[i++])};
}

// --- pictures, as tools/watch.py draws them ---------------------------------------------------

// latents of every image after a step: the unknown positions at the channel means (step_latents)
function stepLatents(model, tokens, mask, B) {
  const values = model.dequantize(tokens), C = model.C;
  for (let i = 0; i < mask.length; i++)
    if (mask[i]) values.set(model.mean, i * C);
  return model.unpatchify(values, B);
}

// one image, one position revealed channel by channel in generation order: image c knows that
// position's channels of AR slots 0..c, the rest of the image is whole
function channelLatents(model, tokens, position) {
  const {N, C} = model, values = new Float32Array(C * N * C), full = model.dequantize(tokens);
  for (let c = 0; c < C; c++) {
    values.set(full, c * N * C);
    for (let slot = c + 1; slot < C; slot++) {
      const channel = model.order[slot];
      values[(c * N + position) * C + channel] = model.mean[channel];
    }
  }
  return model.unpatchify(values, C);
}

function drawImages(model, images, masks, outline, scale = SCALE) {
  const [B, , H, W] = images.dims, data = images.data, canvases = [];
  for (let b = 0; b < B; b++) {
    const canvas = document.createElement("canvas");
    canvas.width = W * scale;
    canvas.height = H * scale;
    const context = canvas.getContext("2d"), pixels = context.createImageData(W, H);
    for (let y = 0; y < H; y++)
      for (let x = 0; x < W; x++) {
        const n = Math.floor(y / model.stride) * model.grid + Math.floor(x / model.stride);
        const unknown = masks && masks[b][n];
        for (let ch = 0; ch < 3; ch++) {
          let v = Math.round((data[((b * 3 + ch) * H + y) * W + x] + 1) * 127.5);
          v = Math.min(255, Math.max(0, v));
          if (unknown) v = Math.round((1 - UNKNOWN_SHADE) * v + UNKNOWN_SHADE * TINT[ch]);
          pixels.data[(y * W + x) * 4 + ch] = v;
        }
        pixels.data[(y * W + x) * 4 + 3] = 255;
      }
    const small = document.createElement("canvas");
    small.width = W;
    small.height = H;
    small.getContext("2d").putImageData(pixels, 0, 0);
    context.imageSmoothingEnabled = false;
    context.drawImage(small, 0, 0, W * scale, H * scale);
    if (outline !== undefined) {
      const s = model.stride * scale;
      context.strokeStyle = "#f5a623";
      context.lineWidth = 2;
      context.strokeRect((outline % model.grid) * s + 1, Math.floor(outline / model.grid) * s + 1,
                         s - 2, s - 2);
    }
    canvases.push(canvas);
  }
  return canvases;
}

function figure(canvas, caption) {
  const item = document.createElement("figure");
  const text = document.createElement("figcaption");
  text.textContent = caption;
  item.append(canvas, text);
  return item;
}

// --- the page ---------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
let model = null, last = null;

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function sample() {
  const settings = {
    numIter: Number($("steps").value), cfg: Number($("cfg").value),
    temperature: Number($("temperature").value), positionOrder: $("order").value,
  };
  const label = Number($("label").value), seed = Number($("seed").value);
  $("button").disabled = true;
  $("positions").replaceChildren();
  $("channels").replaceChildren();
  const started = performance.now();
  let image = null;                                           // the last step's: the sample
  try {
    const tokens = await model.sampleTokens([label], {
      ...settings, random: seededRandom(seed),
      onStep: async (s, known, mask) => {
        image = await model.decode(stepLatents(model, known, mask, 1), 1);
        const left = mask.reduce((a, b) => a + b, 0);
        const [canvas] = drawImages(model, image, [mask]);
        $("positions").append(figure(canvas, `step ${s + 1}: ${model.N - left} of ${model.N}`));
        say(`decoding step ${s + 1} of ${settings.numIter}`);
      },
    });
    last = {tokens, label};
    await showChannels(brightestPosition(image));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    say(`a ${label}, sampled in ${seconds} s. Click a position of the last image to reveal ` +
        "its channels one by one.");
  } catch (e) {
    say(`error: ${e.message}`, true);
  } finally {
    $("button").disabled = false;
  }
}

async function showChannels(position) {
  const {tokens} = last, C = model.C;
  const images = await model.decode(channelLatents(model, tokens, position), C);
  const canvases = drawImages(model, images, null, position, SCALE - 1);
  $("channels").replaceChildren(...canvases.map((canvas, c) => figure(
    canvas, `channel ${model.order[c]}: ${tokens[position * C + model.order[c]]}`)));
  $("position").textContent = ` (row ${Math.floor(position / model.grid) + 1}, ` +
                              `column ${position % model.grid + 1})`;
}

// the position of the most ink, to begin with: a stroke shows its channels best
function brightestPosition(image) {
  const [, , H, W] = image.dims, ink = new Float32Array(model.N);
  for (let y = 0; y < H; y++)
    for (let x = 0; x < W; x++)
      ink[Math.floor(y / model.stride) * model.grid + Math.floor(x / model.stride)] +=
        image.data[y * W + x];
  return ink.indexOf(Math.max(...ink));
}

function pickPosition(event) {
  const canvas = event.target.closest("canvas");
  if (!canvas || !last || canvas !== $("positions").lastChild?.firstChild) return;
  const box = canvas.getBoundingClientRect(), cell = box.width / model.grid;
  const column = Math.floor((event.clientX - box.left) / cell);
  const row = Math.floor((event.clientY - box.top) / cell);
  showChannels(row * model.grid + column).catch((e) => say(`error: ${e.message}`, true));
}

// the run's tuned sampling settings (its sampling.json, copied beside the graphs), when there
async function useTunedSettings(folder) {
  const response = await fetch(`${folder}sampling.json`).catch(() => null);
  if (!response?.ok) return;
  const tuned = await response.json().catch(() => ({}));
  for (const [key, id] of [["cfg", "cfg"], ["temperature", "temperature"], ["num_iter", "steps"]])
    if (Number.isFinite(tuned[key])) $(id).value = String(tuned[key]);
}

async function start() {
  if (typeof WebAssembly !== "object") {
    say("error: this browser runs no WebAssembly, which ONNX Runtime Web needs; open the page in a " +
        "current Chrome, Firefox, Safari or Edge", true);
    return;
  }
  const params = new URLSearchParams(location.search);
  const folder = params.get("model") ?? "model/";
  const provider = params.get("provider") ?? "wasm";
  ort.env.wasm.numThreads = 1;   // threads need cross-origin isolation, which a plain server lacks
  say(`loading the graphs from ${folder} (${provider})`);
  try {
    model = await Model.load(folder, provider);
  } catch (e) {
    say(`error: ${e.message}`, true);
    return;
  }
  await useTunedSettings(folder);
  const classes = model.config.num_classes;
  $("label").replaceChildren(...[...Array(classes).keys()].map((c) => new Option(c, c)));
  $("label").value = String(Math.min(3, classes - 1));
  $("steps").max = model.N;
  $("positions").addEventListener("click", pickPosition);
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); sample(); });
  $("button").disabled = false;
  say(`ready: ${model.N} positions of ${model.C} channels, ${model.config.levels} levels each`);
}

window.tokenbridge = {Model, maskSchedule, replayRandom, seededRandom, get model() { return model; }};
start();
