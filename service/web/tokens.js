// Pictures of tokens and comparisons of embeddings, computed in the page from the API's arrays.

// Top `k` principal directions of rows [n][c] by power iteration with deflation: c is small
// (the latent width), so a c x c covariance is cheap and needs no library.
export function principalComponents(rows, k = 3, iterations = 60) {
  const n = rows.length;
  const c = rows[0].length;
  const mean = new Float64Array(c);
  for (const row of rows) for (let j = 0; j < c; j++) mean[j] += row[j] / n;
  const cov = Array.from({ length: c }, () => new Float64Array(c));
  for (const row of rows) {
    for (let i = 0; i < c; i++) {
      const di = row[i] - mean[i];
      for (let j = i; j < c; j++) cov[i][j] += (di * (row[j] - mean[j])) / n;
    }
  }
  for (let i = 0; i < c; i++) for (let j = 0; j < i; j++) cov[i][j] = cov[j][i];
  const components = [];
  for (let m = 0; m < Math.min(k, c); m++) {
    let v = Float64Array.from({ length: c }, (_, j) => Math.sin(j + 1 + m));
    let lambda = 0;
    for (let it = 0; it < iterations; it++) {
      const w = cov.map((r) => r.reduce((s, x, j) => s + x * v[j], 0));
      lambda = Math.hypot(...w);
      if (lambda < 1e-12) break;
      v = w.map((x) => x / lambda);
    }
    components.push(v);
    for (let i = 0; i < c; i++) for (let j = 0; j < c; j++) cov[i][j] -= lambda * v[i] * v[j];
  }
  return { mean, components };
}

// Each latent frame of an image or video token set as an RGB canvas (one pixel per token).
export function tokenFrames(item) {
  const coords = item.coords.data; // [n][t, x=row, y=column, z]
  const latents = item.latents.data; // [n][c]
  const { mean, components } = principalComponents(latents);
  const projected = latents.map((row) => components.map((v) => v.reduce((s, x, j) => s + x * (row[j] - mean[j]), 0)));
  const range = components.map((_, m) => bounds(projected.map((p) => p[m])));
  const extent = (axis) => 1 + coords.reduce((m, p) => Math.max(m, p[axis]), 0);
  const [frames, height, width] = [extent(0), extent(1), extent(2)];
  const canvases = Array.from({ length: frames }, () => blankCanvas(width, height));
  const images = canvases.map((cv) => cv.getContext("2d").createImageData(width, height));
  coords.forEach(([t, row, column], i) => {
    const offset = 4 * (row * width + column);
    for (let m = 0; m < 3; m++) {
      const [lo, hi] = range[m] || [0, 1];
      const value = projected[i][m] === undefined ? 0 : (projected[i][m] - lo) / (hi - lo || 1);
      images[t].data[offset + m] = Math.round(255 * Math.min(1, Math.max(0, value)));
    }
    images[t].data[offset + 3] = 255;
  });
  canvases.forEach((cv, t) => cv.getContext("2d").putImageData(images[t], 0, 0));
  return canvases;
}

// 2nd and 98th percentiles: a few extreme tokens should not wash out the picture.
function bounds(values) {
  const sorted = Float64Array.from(values).sort();
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1)))];
  return [at(0.02), at(0.98)];
}

function blankCanvas(width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  return canvas;
}

export function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb || 1);
}
