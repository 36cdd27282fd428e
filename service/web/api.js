// Calls to the service's own API. The key lives in sessionStorage and travels only as a header.

const KEY_STORE = "atoken.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The API's own words for a failure: {"error": {"code", "message"}} on every route.
async function failure(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (_) {
    // Not JSON (a proxy's page): keep the status line.
  }
  return new ApiError(response.status, code, message);
}

async function call(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (err) {
    throw new ApiError(0, "network_error", `the service did not answer (${err.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

function upload(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return form;
}

export async function info() {
  return (await call("/info")).json();
}

// Media in, media out: the reconstruction's bytes and the headers that describe it.
export async function reconstruct(file, query = "") {
  const response = await call(`/reconstruct${query}`, { method: "POST", body: upload(file) });
  return { blob: await response.blob(), headers: response.headers };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Long work through the job API: submit, follow progress, fetch the result (the same bytes and
// headers /reconstruct answers). `job.cancel()` asks the server to stop at its next tile.
export function reconstructJob(file, query = "", onProgress = () => {}) {
  const job = { id: null, cancelled: false };
  job.cancel = async () => {
    job.cancelled = true;
    if (job.id) await call(`/jobs/${job.id}`, { method: "DELETE" }).catch(() => {});
  };
  job.done = (async () => {
    let state = await (await call(`/jobs/reconstruct${query}`, { method: "POST", body: upload(file) })).json();
    job.id = state.id;
    if (job.cancelled) await job.cancel();
    while (state.status === "queued" || state.status === "running") {
      onProgress(state);
      await sleep(400);
      state = await (await call(state.links.self)).json();
    }
    onProgress(state);
    if (state.status === "cancelled") throw new ApiError(410, "cancelled", "cancelled");
    const response = await call(state.links.result); // a failed job answers its error here
    return { blob: await response.blob(), headers: response.headers };
  })();
  return job;
}

export async function tokenize(file, query = "") {
  const params = new URLSearchParams(query);
  params.set("array_format", "list");
  const response = await call(`/tokenize?${params}`, { method: "POST", body: upload(file) });
  return (await response.json()).items[0];
}

export async function embed(file, query = "") {
  const response = await call(`/encode${query}`, { method: "POST", body: upload(file) });
  return (await response.json()).items[0].embedding;
}
