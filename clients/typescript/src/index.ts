/**
 * rankserve TypeScript client: rank candidates with a rankserve ranker over KServe v2 HTTP/JSON.
 * Node 20+, no runtime dependencies (node:http and node:https with keep-alive, AbortSignal.timeout).
 *
 *   const client = new RankerClient("http://127.0.0.1:8000");
 *   const ranked = await client.rank("turquoise pillows", [["sku-1", "Turquoise Velvet Pillow"], ["sku-2", "Oak Table"]], { topK: 1 });
 *
 * Behind a gateway with TLS and a token:
 *   new RankerClient("https://ranker.example.com", { headers: { Authorization: `Bearer ${token}` }, tls: { ca: readFileSync("ca.pem") } });
 */
import * as http from "node:http";
import * as https from "node:https";

export class RankerError extends Error {
  readonly retryable: boolean = false;
  /** Milliseconds the server or a gateway asked to wait (HTTP `Retry-After`), if it said. */
  retryAfterMs?: number;
  /** False when the request never reached a server (connection refused, name not resolved): not counted by the retry budget. */
  reached = true;
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}
/** The server refused the request as malformed (HTTP 400, other 4xx). Never retried. */
export class BadRequest extends RankerError {}
/** The server or a gateway refused the body's size (HTTP 413). Never retried: send fewer or shorter candidates (`chunkSize`). */
export class RequestTooLarge extends BadRequest {}
/** The server is down or cannot take the request now (HTTP 502/503, connection refused, a dead stub). Retried `retries` times. */
export class Unavailable extends RankerError {
  override readonly retryable = true;
}
/** The server or a gateway shed the request under load (queue full, HTTP 429, a gateway's 503). Retried `overloadRetries`
 * times with a longer backoff (or the `Retry-After` sent), only while the retry budget allows. */
export class Overloaded extends Unavailable {}
/** No answer within the call's timeout. Not retried. */
export class Timeout extends RankerError {}
/** The server failed while handling the request (HTTP 5xx). */
export class ServerError extends RankerError {}
/** The model does not expose the ranker API (thrown by `checkApi`, which `rank` runs before a model's first call). */
export class ApiMismatch extends RankerError {}
/** The server or its gateway refused the credentials (HTTP 401): a missing or wrong token in `headers`. Never retried. */
export class Unauthenticated extends RankerError {}
/** The credentials do not allow this call (HTTP 403). Never retried. */
export class PermissionDenied extends RankerError {}
/** The TLS handshake failed: the server's certificate is not trusted (pass its CA as `tls.ca`) or does not name the host,
 * or the server wants a client certificate (`tls.cert`, `tls.key`). Never retried. */
export class TlsError extends RankerError {}

export type ItemId = string | number;
export type ItemLike = string | [ItemId, string] | { id: ItemId; text: string };
export interface RankedItem {
  id: ItemId;
  text: string;
  score: number;
  /** 1 = best */
  rank: number;
}
/**
 * How much of a request the ranker's vocabulary covers: tokens its tokenizer could only map to the unknown token (`[UNK]`)
 * and all tokens, of the query and of the candidate texts, as the ranker read them (after truncation; special tokens and
 * padding not counted). Summed over chunks; the query counted once.
 */
export interface TokenCounts {
  queryUnknown: number;
  queryTokens: number;
  textsUnknown: number;
  textsTokens: number;
}
/** `rank`'s result: the ranked items, best first, with `tokenCounts` when the server reports them (the `token_counts` output). */
export type Ranking = RankedItem[] & { tokenCounts?: TokenCounts };
/** More than half of the query is unknown to the ranker's vocabulary: its scores mean little (the server's threshold). */
export function queryMostlyUnknown(counts: TokenCounts): boolean {
  return counts.queryTokens > 0 && counts.queryUnknown / counts.queryTokens > 0.5;
}

/**
 * Retry throttling as gRPC does it (gRFC A6, "retryThrottling"), shared by every call of a client (pass one object to several
 * clients to share it). The bucket starts full at `maxTokens`; every attempt that reached a server and failed with a retryable
 * error takes one token, every successful call gives back `tokenRatio`; `Overloaded` is retried only while more than half the
 * bucket is left. The same defaults as the Python SDK: 10 tokens, 0.1 per success.
 */
export class RetryBudget {
  readonly maxTokens: number;
  readonly tokenRatio: number;
  tokens: number;
  /** Retries the budget refused so far. */
  throttled = 0;
  constructor(maxTokens = 10, tokenRatio = 0.1) {
    if (!(maxTokens > 0 && maxTokens <= 1000) || !(tokenRatio > 0 && tokenRatio <= 1)) {
      throw new Error(`RetryBudget needs 0 < maxTokens <= 1000 and 0 < tokenRatio <= 1, got ${maxTokens}, ${tokenRatio}`);
    }
    this.maxTokens = maxTokens;
    this.tokenRatio = tokenRatio;
    this.tokens = maxTokens;
  }
  recordSuccess(): void {
    this.tokens = Math.min(this.maxTokens, this.tokens + this.tokenRatio);
  }
  recordFailure(): void {
    this.tokens = Math.max(0, this.tokens - 1);
  }
  allowsRetry(): boolean {
    const allowed = this.tokens > this.maxTokens / 2;
    if (!allowed) this.throttled++;
    return allowed;
  }
}

export const BACKOFF_CAP_MS = 2000;
export const OVERLOAD_BACKOFF_CAP_MS = 8000;
/** A longer `Retry-After` is not waited for: the error is thrown with its `retryAfterMs`. */
export const MAX_RETRY_AFTER_MS = 10_000;

export interface RetryPolicy {
  retries: number;
  backoffMs: number;
  overloadRetries: number;
  overloadBackoffMs: number;
}

/** One call's retries: how many of each kind so far, and the wait before the next attempt (undefined: throw). */
export class RetryState {
  unavailable = 0;
  overloaded = 0;
  constructor(readonly policy: RetryPolicy, readonly budget: RetryBudget | null) {}
  get attempt(): number {
    return this.unavailable + this.overloaded;
  }
  succeeded(): void {
    this.budget?.recordSuccess();
  }
  delayAfter(error: RankerError): number | undefined {
    if (!error.retryable) return undefined;
    if (this.budget && error.reached) this.budget.recordFailure();
    const overloaded = error instanceof Overloaded;
    if (overloaded) {
      if (this.overloaded >= this.policy.overloadRetries || (this.budget && !this.budget.allowsRetry())) return undefined;
    } else if (this.unavailable >= this.policy.retries) return undefined;
    let delay: number;
    if (error.retryAfterMs !== undefined) {
      if (error.retryAfterMs > MAX_RETRY_AFTER_MS) return undefined;
      delay = error.retryAfterMs * (1 + Math.random() * 0.1); // at least what was asked, not all at the same instant
    } else if (overloaded) {
      const top = Math.min(OVERLOAD_BACKOFF_CAP_MS, this.policy.overloadBackoffMs * 2 ** this.overloaded);
      delay = top / 2 + (Math.random() * top) / 2;
    } else {
      delay = Math.random() * Math.min(BACKOFF_CAP_MS, this.policy.backoffMs * 2 ** this.unavailable);
    }
    if (overloaded) this.overloaded++;
    else this.unavailable++;
    return delay;
  }
}

/** HTTP `Retry-After` (delay-seconds or an HTTP-date) in milliseconds from now; undefined if absent or unreadable. */
export function parseRetryAfter(value: string | string[] | undefined): number | undefined {
  const text = (Array.isArray(value) ? value[0] : value)?.trim();
  if (!text) return undefined;
  const seconds = Number(text);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const when = Date.parse(text);
  return Number.isFinite(when) ? Math.max(0, when - Date.now()) : undefined;
}

export interface ClientOptions {
  model?: string;
  timeoutMs?: number;
  /** Extra attempts after `Unavailable` (down, restarting): full-jitter backoff from `backoffMs` (100), capped at 2 s. Default 3. */
  retries?: number;
  backoffMs?: number;
  /** Extra attempts after `Overloaded` (shed): backoff from `overloadBackoffMs` (500), doubled each time, jittered between
   * half and all of it, capped at 8 s, or the `Retry-After` sent (up to 10 s); only while `retryBudget` allows.
   * Default `min(retries, 2)`: `retries: 0` means no retry at all. */
  overloadRetries?: number;
  overloadBackoffMs?: number;
  /** Default: a fresh `RetryBudget()` per client; `null`: no budget. */
  retryBudget?: RetryBudget | null;
  /** Called before each retry (to count or log them); `attempt` 1 is the first retry. */
  onRetry?: (error: RankerError, attempt: number, delayMs: number) => void;
  /** Most candidates per request (the server accepts 1000 by default). */
  chunkSize?: number;
  /** Chunks of one long list in flight at once (default 4); results keep their order. */
  chunkConcurrency?: number;
  /** Sent with every call, e.g. `{ Authorization: "Bearer <token>" }` for a gateway; a call's own headers add to or replace them. */
  headers?: Record<string, string>;
  /** Check the model's metadata before its first `rank` (once per model and client) and throw `ApiMismatch` if it is not
   * a ranker, as the Python SDK does at connect. Default true. */
  checkApi?: boolean;
  /** For https:// URLs, PEM contents: `ca` the CA bundle that signed the server's certificate (default: Node's CAs),
   * `cert` and `key` a client certificate for mutual TLS. */
  tls?: TlsOptions;
}
export interface TlsOptions {
  ca?: string | Buffer | (string | Buffer)[];
  cert?: string | Buffer;
  key?: string | Buffer;
}
export interface CallOptions {
  /** Added to the client's headers; the same name (any case) replaces the client's. */
  headers?: Record<string, string>;
}
export interface RankOptions extends CallOptions {
  topK?: number;
  model?: string;
  timeoutMs?: number;
}

const API_INPUTS: Record<string, string> = { query: "BYTES", texts: "BYTES", top_k: "INT32" };
const API_OUTPUTS: Record<string, string> = { indices: "INT32", scores: "FP32" };

export function toItems(items: ItemLike[]): { id: ItemId; text: string }[] {
  return items.map((it, i) => {
    if (typeof it === "string") return { id: i, text: it };
    if (Array.isArray(it) && it.length === 2 && typeof it[1] === "string") return { id: it[0], text: it[1] };
    if (it && typeof it === "object" && "text" in it && typeof it.text === "string") return { id: it.id, text: it.text };
    throw new BadRequest(`item ${i} must be a string, an [id, text] pair or {id, text}`);
  });
}

/**
 * The error for an HTTP answer, by its status first: a 4xx is never retried whatever its body says. `fromServer`: the body was
 * Triton's JSON error (false: a gateway's or proxy's own page, or no body).
 */
export function errorFromStatus(status: number, message: string, fromServer = true): RankerError {
  if (status === 401) return new Unauthenticated(message);
  if (status === 403) return new PermissionDenied(message);
  if (status === 408 || status === 504) return new Timeout(message);
  if (status === 413) {
    return new RequestTooLarge(`the request is too large for the server or a gateway in front of it (HTTP 413): send fewer or shorter candidates per request (chunkSize) (${message.slice(0, 300)})`);
  }
  if (status === 429) return new Overloaded(message);
  if (status >= 400 && status < 500) return new BadRequest(message);
  if (/exceeds maximum queue size|rate limit/i.test(message)) return new Overloaded(message); // Triton's words for a full queue
  if (status === 503) return fromServer ? new Unavailable(message) : new Overloaded(message); // a gateway's 503: a rate or connection limit
  if (status === 502 || /is not healthy/.test(message)) return new Unavailable(message); // a gateway that cannot reach the server; a dead stub
  if (status >= 500) return new ServerError(message);
  return new BadRequest(message);
}

/** Node's codes for a connection that was never made: the request did not reach any server. */
const NOT_SENT = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL"]);

/** Node's codes for a certificate it does not trust or that does not match the host. */
const TLS_CODES = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE", "UNABLE_TO_GET_ISSUER_CERT", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT", "CERT_UNTRUSTED", "CERT_HAS_EXPIRED", "CERT_NOT_YET_VALID", "ERR_TLS_CERT_ALTNAME_INVALID",
  "CERT_SIGNATURE_FAILURE", "CERT_REJECTED",
]);

/** The client's headers, then each layer's: a later name replaces an earlier one in any case. */
export function mergeHeaders(...layers: (Record<string, string> | undefined)[]): Record<string, string> {
  const merged: Record<string, string> = {};
  for (const layer of layers) {
    for (const [key, value] of Object.entries(layer ?? {})) {
      if (!key || typeof value !== "string" || /[\r\n]/.test(key + value)) throw new Error(`bad header ${JSON.stringify(key)}: ${JSON.stringify(value)}`);
      for (const old of Object.keys(merged)) if (old.toLowerCase() === key.toLowerCase()) delete merged[old];
      merged[key] = value;
    }
  }
  return merged;
}

/** `work` over `inputs`, at most `limit` at a time; results in the inputs' order; the first failure rejects (no new work starts). */
export async function inOrder<T, R>(inputs: T[], limit: number, work: (input: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(inputs.length);
  let next = 0;
  let failed = false;
  const worker = async () => {
    while (!failed && next < inputs.length) {
      const i = next++;
      try {
        results[i] = await work(inputs[i]);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, inputs.length) }, worker));
  return results;
}

interface V2Tensor {
  name: string;
  datatype: string;
  shape: number[];
  data: unknown[];
}

/** How long an address whose server refused or dropped a call is tried last (as the Python SDK). */
export const FAILED_ADDRESS_MS = 2000;

/**
 * The servers a client calls: one, or several for failover (`http://a:8000,b:8000`). Each call starts at the next address in
 * turn, skipping one that failed in the last `FAILED_ADDRESS_MS`; each retry goes to the next address, so a server that is
 * stopping (it refuses connections while it drains), restarting or gone costs a retrying client no failed call.
 */
export class Addresses {
  readonly all: string[];
  private turn = 0;
  private readonly failedAt = new Map<number, number>();

  constructor(baseUrls: string[]) {
    this.all = baseUrls;
  }

  first(now = Date.now()): number {
    if (this.all.length === 1) return 0;
    const order = this.all.map((_, k) => (this.turn + k) % this.all.length);
    this.turn = (this.turn + 1) % this.all.length;
    const healthy = order.filter((i) => now - (this.failedAt.get(i) ?? -Infinity) >= FAILED_ADDRESS_MS);
    return (healthy.length ? healthy : order)[0];
  }

  after(index: number, error: RankerError, now = Date.now()): number {
    if (this.all.length === 1) return index;
    if (error.retryable) this.failedAt.set(index, now);
    return (index + 1) % this.all.length;
  }
}

/** `http://a:8000,b:8000` (or `a:8000,b:8000`, or `https://...`) -> one base URL per address. */
export function parseUrls(url: string): string[] {
  const trimmed = url.trim();
  const scheme = trimmed.includes("://") ? trimmed.slice(0, trimmed.indexOf("://")) : "http";
  if (scheme !== "http" && scheme !== "https") {
    throw new Error(`unsupported URL ${url}: the TypeScript client speaks HTTP/JSON (http:// or https://)`);
  }
  const rest = trimmed.includes("://") ? trimmed.slice(trimmed.indexOf("://") + 3) : trimmed;
  const hosts = rest.replace(/\/+$/, "").split(",").map((h) => h.trim());
  if (hosts.some((h) => !h)) throw new Error(`empty address in ${url}: write host:port[,host:port...]`);
  return hosts.map((h) => `${scheme}://${h}`);
}

export class RankerClient {
  readonly baseUrl: string;
  /** Every address of `url` (several, comma-separated, for failover). */
  readonly addresses: Addresses;
  readonly model: string;
  readonly timeoutMs: number;
  readonly retries: number;
  readonly backoffMs: number;
  readonly overloadRetries: number;
  readonly overloadBackoffMs: number;
  readonly retryBudget: RetryBudget | null;
  readonly onRetry?: (error: RankerError, attempt: number, delayMs: number) => void;
  readonly chunkSize: number;
  readonly chunkConcurrency: number;
  readonly headers: Record<string, string>;
  readonly checkApiFirst: boolean;
  private readonly secure: boolean;
  private readonly agent: http.Agent;
  /** model -> its API check, done once (dropped when it failed, so a later call checks again). */
  private readonly checked = new Map<string, Promise<void>>();

  /** `url`: `http://host:port`, `https://host[:port]` (or `host:port`); several comma-separated addresses
   * (`http://a:8000,b:8000`) for failover: calls take them in turn, a retry goes to the next one. Safe to share across
   * concurrent calls. */
  constructor(url: string, options: ClientOptions = {}) {
    this.addresses = new Addresses(parseUrls(url));
    this.baseUrl = this.addresses.all[0];
    this.secure = this.baseUrl.startsWith("https://");
    const tls = options.tls ?? {};
    if (!this.secure && (tls.ca || tls.cert || tls.key)) throw new Error("tls options are for https:// URLs");
    if (!tls.cert !== !tls.key) throw new Error("tls.cert and tls.key go together: the client certificate and its key (mutual TLS)");
    this.headers = mergeHeaders(options.headers);
    this.agent = this.secure ? new https.Agent({ keepAlive: true, ca: tls.ca, cert: tls.cert, key: tls.key }) : new http.Agent({ keepAlive: true });
    this.model = options.model ?? "ranker";
    this.checkApiFirst = options.checkApi ?? true;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.retries = options.retries ?? 3;
    this.backoffMs = options.backoffMs ?? 100;
    this.overloadRetries = options.overloadRetries ?? Math.min(this.retries, 2); // retries: 0 still means no retry at all
    this.overloadBackoffMs = options.overloadBackoffMs ?? 500;
    for (const [name, value] of Object.entries({ retries: this.retries, overloadRetries: this.overloadRetries })) {
      if (!Number.isInteger(value) || value < 0) throw new Error(`${name} must be an integer >= 0, got ${value}`);
    }
    for (const [name, value] of Object.entries({ backoffMs: this.backoffMs, overloadBackoffMs: this.overloadBackoffMs })) {
      if (!Number.isFinite(value) || value < 0) throw new Error(`${name} must be a number of milliseconds >= 0, got ${value}`);
    }
    this.retryBudget = options.retryBudget === undefined ? new RetryBudget() : options.retryBudget;
    this.onRetry = options.onRetry;
    this.chunkSize = options.chunkSize ?? 1000;
    this.chunkConcurrency = options.chunkConcurrency ?? 4;
    if (!Number.isInteger(this.chunkSize) || this.chunkSize < 1) throw new Error(`chunkSize must be an integer >= 1, got ${this.chunkSize}`);
    if (!Number.isInteger(this.chunkConcurrency) || this.chunkConcurrency < 1) {
      throw new Error(`chunkConcurrency must be an integer >= 1, got ${this.chunkConcurrency}`);
    }
  }

  /** One HTTP exchange: status, `Retry-After` and body text. */
  private send(method: string, path: string, body: string | undefined, headers: Record<string, string>, timeoutMs: number, index = 0): Promise<{ status: number; retryAfter?: string; text: string }> {
    return new Promise((resolve, reject) => {
      const request = (this.secure ? https : http).request(
        this.addresses.all[index] + path,
        { method, agent: this.agent, headers: body === undefined ? headers : { ...headers, "Content-Type": "application/json" }, signal: AbortSignal.timeout(timeoutMs) },
        (response) => {
          const chunks: Uint8Array[] = [];
          response.on("data", (chunk: Uint8Array) => chunks.push(chunk));
          response.on("error", reject);
          response.on("close", () => {
            if (response.complete) {
              resolve({ status: response.statusCode ?? 0, retryAfter: response.headers["retry-after"], text: Buffer.concat(chunks).toString("utf8") });
            }
            else reject(Object.assign(new Error("the connection closed before the response ended"), { code: "ECONNRESET" }));
          });
        },
      );
      request.on("error", reject);
      request.end(body);
    });
  }

  private toError(err: any, timeoutMs: number, index = 0): RankerError {
    if (err instanceof RankerError) return err;
    if (err?.name === "TimeoutError" || err?.name === "AbortError") return new Timeout(`no answer within ${timeoutMs} ms`);
    const code = err?.code ?? err?.cause?.code;
    if (TLS_CODES.has(code) || String(code).startsWith("ERR_SSL_")) {
      return new TlsError(`TLS handshake with ${this.addresses.all[index]} failed: ${code} ${err?.message ?? ""} (an untrusted server certificate: pass the CA that signed it as tls.ca; a server that wants a client certificate: tls.cert and tls.key)`);
    }
    if (typeof code !== "string") return new RankerError(`${err?.name ?? "Error"}: ${err?.message ?? err}`); // not the network's: not retried
    const error = new Unavailable(`cannot reach ${this.addresses.all[index]}: ${code} ${err?.message ?? ""}`.trimEnd());
    error.reached = !NOT_SENT.has(code);
    return error;
  }

  private async request(method: string, path: string, body: string | undefined, headers: Record<string, string> | undefined, timeoutMs: number): Promise<any> {
    const sent = mergeHeaders(this.headers, headers);
    const state = new RetryState(this, this.retryBudget);
    let index = this.addresses.first();
    for (;;) {
      let result: any;
      try {
        result = await this.exchange(method, path, body, sent, timeoutMs, index);
      } catch (err: any) {
        const error = this.toError(err, timeoutMs, index);
        index = this.addresses.after(index, error);
        const delay = state.delayAfter(error);
        if (delay === undefined) throw error;
        this.onRetry?.(error, state.attempt, delay);
        await new Promise((resolve) => setTimeout(resolve, delay));
        continue;
      }
      state.succeeded();
      return result;
    }
  }

  /** One attempt: the parsed JSON body, or the error its status (first) and body say. */
  private async exchange(method: string, path: string, body: string | undefined, headers: Record<string, string>, timeoutMs: number, index = 0): Promise<any> {
    const response = await this.send(method, path, body, headers, timeoutMs, index);
    const ok = response.status >= 200 && response.status < 300;
    let parsed: any;
    try {
      parsed = response.text ? JSON.parse(response.text) : undefined;
    } catch {
      parsed = undefined; // e.g. a gateway's HTML page
    }
    if (ok) {
      if (typeof parsed !== "object" || parsed === null) throw new ServerError(`HTTP ${response.status} with a body that is not a JSON object: ${JSON.stringify(response.text.slice(0, 200))}`);
      return parsed;
    }
    const fromServer = typeof parsed?.error === "string";
    const message = fromServer
      ? parsed.error
      : `HTTP ${response.status} from ${this.addresses.all[index]} or a gateway in front of it, with a body that is not Triton's JSON: ${JSON.stringify(response.text.slice(0, 200))}`;
    const error = errorFromStatus(response.status, message, fromServer);
    error.retryAfterMs = parseRetryAfter(response.retryAfter);
    throw error;
  }

  async isReady(model: string = this.model, options: CallOptions = {}): Promise<boolean> {
    try {
      const response = await this.send("GET", `/v2/models/${model}/ready`, undefined, mergeHeaders(this.headers, options.headers), this.timeoutMs);
      return response.status === 200;
    } catch {
      return false;
    }
  }

  /** Throws ApiMismatch unless `model` exposes query/texts/top_k -> indices/scores. */
  async checkApi(model: string = this.model, options: CallOptions = {}): Promise<void> {
    const meta = await this.request("GET", `/v2/models/${model}`, undefined, options.headers, this.timeoutMs);
    const inputs = Object.fromEntries((meta.inputs ?? []).map((t: any) => [t.name, t.datatype]));
    const outputs = Object.fromEntries((meta.outputs ?? []).map((t: any) => [t.name, t.datatype]));
    const missing = [
      ...Object.entries(API_INPUTS).filter(([k, v]) => inputs[k] !== v).map(([k, v]) => `input ${k}:${v}`),
      ...Object.entries(API_OUTPUTS).filter(([k, v]) => outputs[k] !== v).map(([k, v]) => `output ${k}:${v}`),
    ];
    if (missing.length) {
      throw new ApiMismatch(`model '${model}' does not speak the ranker API: lacks or mistypes ${missing.join(", ")} `
        + `(has inputs ${JSON.stringify(inputs)}, outputs ${JSON.stringify(outputs)})`);
    }
  }

  /** `checkApi(model)` once per model (unless the client was made with `checkApi: false`). */
  private ensureApi(model: string, headers: Record<string, string> | undefined): Promise<void> {
    if (!this.checkApiFirst) return Promise.resolve();
    let check = this.checked.get(model);
    if (!check) {
      check = this.checkApi(model, { headers });
      this.checked.set(model, check);
      check.catch(() => this.checked.delete(model));
    }
    return check;
  }

  /** Rank `items` for `query`, best first; long lists go out in chunks merged by score. */
  async rank(query: string, items: ItemLike[], options: RankOptions = {}): Promise<Ranking> {
    const all = toItems(items);
    if (!query.trim()) throw new BadRequest("query must be a non-empty string");
    if (all.length === 0) throw new BadRequest("items is empty: send at least one candidate");
    const { topK, model = this.model, timeoutMs = this.timeoutMs, headers } = options;
    if (topK !== undefined && (!Number.isInteger(topK) || topK < 1)) throw new BadRequest(`topK must be a positive integer, got ${topK}`);
    if (topK !== undefined && topK > all.length) throw new BadRequest(`topK is ${topK} but there are only ${all.length} items: send topK <= ${all.length}, or omit it for all`);
    await this.ensureApi(model, headers);
    const starts: number[] = [];
    for (let s = 0; s < all.length; s += this.chunkSize) starts.push(s);
    const parts = await inOrder(starts, this.chunkConcurrency, async (start) => {
      const texts = all.slice(start, start + this.chunkSize).map((it) => it.text);
      const inputs: V2Tensor[] = [
        { name: "query", datatype: "BYTES", shape: [1], data: [query] },
        { name: "texts", datatype: "BYTES", shape: [texts.length], data: texts },
      ];
      if (topK !== undefined) inputs.push({ name: "top_k", datatype: "INT32", shape: [1], data: [Math.min(topK, texts.length)] });
      const body = await this.request("POST", `/v2/models/${model}/infer`, JSON.stringify({ inputs }), headers, timeoutMs);
      const out = Object.fromEntries((Array.isArray(body.outputs) ? (body.outputs as V2Tensor[]) : []).map((t) => [t?.name, t?.data as number[]]));
      if (!Array.isArray(out.indices) || !Array.isArray(out.scores) || out.indices.length !== out.scores.length) {
        throw new ApiMismatch(`model '${model}' answered without matching indices and scores (outputs: ${JSON.stringify(Object.keys(out))}): it is not a ranker`);
      }
      const counts = Array.isArray(out.token_counts) && out.token_counts.length === 4 ? out.token_counts.map(Number) : undefined;
      return { counts, scored: out.indices.map((index, i) => ({ position: start + index, score: out.scores[i] })) };
    });
    const merged = parts.flatMap((p) => p.scored).sort((a, b) => b.score - a.score || a.position - b.position);
    const ranking: Ranking = merged.slice(0, topK ?? merged.length).map((m, r) => ({ id: all[m.position].id, text: all[m.position].text, score: m.score, rank: r + 1 }));
    if (parts.every((p) => p.counts)) {
      const rows = parts.map((p) => p.counts!);
      ranking.tokenCounts = { queryUnknown: rows[0][0], queryTokens: rows[0][1], textsUnknown: rows.reduce((n, r) => n + r[2], 0),
                              textsTokens: rows.reduce((n, r) => n + r[3], 0) };
    }
    return ranking;
  }

  /** Closes the kept-alive connections (the process can exit without waiting for them to time out). */
  close(): void {
    this.agent.destroy();
  }
}
