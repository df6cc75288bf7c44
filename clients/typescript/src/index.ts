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
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}
/** The server refused the request as malformed (HTTP 400). Never retried. */
export class BadRequest extends RankerError {}
/** The server is down or cannot take the request now (HTTP 503, connection refused). Retried. */
export class Unavailable extends RankerError {
  override readonly retryable = true;
}
/** The server shed the request under load (HTTP 429, queue full). Retried. */
export class Overloaded extends Unavailable {}
/** No answer within the call's timeout. Not retried. */
export class Timeout extends RankerError {}
/** The server failed while handling the request (HTTP 5xx). */
export class ServerError extends RankerError {}
/** The model does not expose the ranker API. */
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
export interface ClientOptions {
  model?: string;
  timeoutMs?: number;
  retries?: number;
  backoffMs?: number;
  /** Most candidates per request (the server accepts 1000 by default). */
  chunkSize?: number;
  /** Sent with every call, e.g. `{ Authorization: "Bearer <token>" }` for a gateway; a call's own headers add to or replace them. */
  headers?: Record<string, string>;
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

export function errorFromStatus(status: number, message: string): RankerError {
  if (status === 401) return new Unauthenticated(message);
  if (status === 403) return new PermissionDenied(message);
  if (status === 429 || /exceeds maximum queue size/i.test(message)) return new Overloaded(message);
  if (status === 503 || /is not healthy/.test(message)) return new Unavailable(message); // a dead stub: `rankserve serve` restarts the server
  if (status === 504) return new Timeout(message);
  if (status >= 500) return new ServerError(message);
  return new BadRequest(message);
}

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

interface V2Tensor {
  name: string;
  datatype: string;
  shape: number[];
  data: unknown[];
}

export class RankerClient {
  readonly baseUrl: string;
  readonly model: string;
  readonly timeoutMs: number;
  readonly retries: number;
  readonly backoffMs: number;
  readonly chunkSize: number;
  readonly headers: Record<string, string>;
  private readonly secure: boolean;
  private readonly agent: http.Agent;

  /** `url`: `http://host:port`, `https://host[:port]` (or `host:port`). Safe to share across concurrent calls. */
  constructor(url: string, options: ClientOptions = {}) {
    this.baseUrl = (url.includes("://") ? url : `http://${url}`).replace(/\/+$/, "");
    if (!this.baseUrl.startsWith("http://") && !this.baseUrl.startsWith("https://")) {
      throw new Error(`unsupported URL ${url}: the TypeScript client speaks HTTP/JSON (http:// or https://)`);
    }
    this.secure = this.baseUrl.startsWith("https://");
    const tls = options.tls ?? {};
    if (!this.secure && (tls.ca || tls.cert || tls.key)) throw new Error("tls options are for https:// URLs");
    if (!tls.cert !== !tls.key) throw new Error("tls.cert and tls.key go together: the client certificate and its key (mutual TLS)");
    this.headers = mergeHeaders(options.headers);
    this.agent = this.secure ? new https.Agent({ keepAlive: true, ca: tls.ca, cert: tls.cert, key: tls.key }) : new http.Agent({ keepAlive: true });
    this.model = options.model ?? "ranker";
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.retries = options.retries ?? 3;
    this.backoffMs = options.backoffMs ?? 100;
    this.chunkSize = options.chunkSize ?? 1000;
  }

  /** One HTTP exchange: status and body text. */
  private send(method: string, path: string, body: string | undefined, headers: Record<string, string>, timeoutMs: number): Promise<{ status: number; text: string }> {
    return new Promise((resolve, reject) => {
      const request = (this.secure ? https : http).request(
        this.baseUrl + path,
        { method, agent: this.agent, headers: body === undefined ? headers : { ...headers, "Content-Type": "application/json" }, signal: AbortSignal.timeout(timeoutMs) },
        (response) => {
          const chunks: Uint8Array[] = [];
          response.on("data", (chunk: Uint8Array) => chunks.push(chunk));
          response.on("error", reject);
          response.on("close", () => {
            if (response.complete) resolve({ status: response.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") });
            else reject(Object.assign(new Error("the connection closed before the response ended"), { code: "ECONNRESET" }));
          });
        },
      );
      request.on("error", reject);
      request.end(body);
    });
  }

  private toError(err: any, timeoutMs: number): RankerError {
    if (err instanceof RankerError) return err;
    if (err?.name === "TimeoutError" || err?.name === "AbortError") return new Timeout(`no answer within ${timeoutMs} ms`);
    const code = err?.code ?? err?.cause?.code;
    if (TLS_CODES.has(code) || String(code).startsWith("ERR_SSL_")) {
      return new TlsError(`TLS handshake with ${this.baseUrl} failed: ${code} ${err?.message ?? ""} (an untrusted server certificate: pass the CA that signed it as tls.ca; a server that wants a client certificate: tls.cert and tls.key)`);
    }
    return new Unavailable(`cannot reach ${this.baseUrl}: ${code ?? err?.message ?? err}`);
  }

  private async request(method: string, path: string, body: string | undefined, headers: Record<string, string> | undefined, timeoutMs: number): Promise<any> {
    const sent = mergeHeaders(this.headers, headers);
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await this.send(method, path, body, sent, timeoutMs);
        let parsed: any = {};
        try {
          parsed = response.text ? JSON.parse(response.text) : {};
        } catch {
          parsed = { error: `HTTP ${response.status}: ${response.text.slice(0, 200)}` }; // e.g. a proxy's HTML page
        }
        if (response.status < 200 || response.status >= 300) throw errorFromStatus(response.status, parsed.error ?? `HTTP ${response.status}`);
        return parsed;
      } catch (err: any) {
        const error = this.toError(err, timeoutMs);
        if (!error.retryable || attempt >= this.retries) throw error;
        const delay = Math.random() * Math.min(2000, this.backoffMs * 2 ** attempt);
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
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
    if (missing.length) throw new ApiMismatch(`model '${model}' does not speak the ranker API: lacks or mistypes ${missing.join(", ")}`);
  }

  /** Rank `items` for `query`, best first; long lists go out in chunks merged by score. */
  async rank(query: string, items: ItemLike[], options: RankOptions = {}): Promise<RankedItem[]> {
    const all = toItems(items);
    if (!query.trim()) throw new BadRequest("query must be a non-empty string");
    if (all.length === 0) throw new BadRequest("items is empty: send at least one candidate");
    const { topK, model = this.model, timeoutMs = this.timeoutMs, headers } = options;
    if (topK !== undefined && (!Number.isInteger(topK) || topK < 1)) throw new BadRequest(`topK must be a positive integer, got ${topK}`);
    if (topK !== undefined && topK > all.length) throw new BadRequest(`topK is ${topK} but there are only ${all.length} items: send topK <= ${all.length}, or omit it for all`);
    const starts: number[] = [];
    for (let s = 0; s < all.length; s += this.chunkSize) starts.push(s);
    const parts = await Promise.all(
      starts.map(async (start) => {
        const texts = all.slice(start, start + this.chunkSize).map((it) => it.text);
        const inputs: V2Tensor[] = [
          { name: "query", datatype: "BYTES", shape: [1], data: [query] },
          { name: "texts", datatype: "BYTES", shape: [texts.length], data: texts },
        ];
        if (topK !== undefined) inputs.push({ name: "top_k", datatype: "INT32", shape: [1], data: [Math.min(topK, texts.length)] });
        const body = await this.request("POST", `/v2/models/${model}/infer`, JSON.stringify({ inputs }), headers, timeoutMs);
        const out = Object.fromEntries((body.outputs as V2Tensor[]).map((t) => [t.name, t.data as number[]]));
        return out.indices.map((index, i) => ({ position: start + index, score: out.scores[i] }));
      }),
    );
    const merged = parts.flat().sort((a, b) => b.score - a.score || a.position - b.position);
    return merged.slice(0, topK ?? merged.length).map((m, r) => ({ id: all[m.position].id, text: all[m.position].text, score: m.score, rank: r + 1 }));
  }

  /** Closes the kept-alive connections (the process can exit without waiting for them to time out). */
  close(): void {
    this.agent.destroy();
  }
}
