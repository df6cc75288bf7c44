/**
 * rankserve TypeScript client: rank candidates with a rankserve ranker over KServe v2 HTTP/JSON.
 * Node 20+, no runtime dependencies (global fetch, AbortSignal.timeout).
 *
 *   const client = new RankerClient("http://127.0.0.1:8000");
 *   const ranked = await client.rank("turquoise pillows", [["sku-1", "Turquoise Velvet Pillow"], ["sku-2", "Oak Table"]], { topK: 1 });
 */

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
}
export interface RankOptions {
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
  if (status === 429 || /exceeds maximum queue size/i.test(message)) return new Overloaded(message);
  if (status === 503 || /is not healthy/.test(message)) return new Unavailable(message); // a dead stub: `rankserve serve` restarts the server
  if (status === 504) return new Timeout(message);
  if (status >= 500) return new ServerError(message);
  return new BadRequest(message);
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

  /** `url`: `http://host:port` (or `host:port`). Safe to share across concurrent calls. */
  constructor(url: string, options: ClientOptions = {}) {
    this.baseUrl = (url.includes("://") ? url : `http://${url}`).replace(/\/+$/, "");
    if (!this.baseUrl.startsWith("http://") && !this.baseUrl.startsWith("https://")) {
      throw new Error(`unsupported URL ${url}: the TypeScript client speaks HTTP/JSON`);
    }
    this.model = options.model ?? "ranker";
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.retries = options.retries ?? 3;
    this.backoffMs = options.backoffMs ?? 100;
    this.chunkSize = options.chunkSize ?? 1000;
  }

  private async request(path: string, init: RequestInit, timeoutMs: number): Promise<any> {
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await fetch(this.baseUrl + path, { ...init, signal: AbortSignal.timeout(timeoutMs) });
        const text = await response.text();
        const body = text ? JSON.parse(text) : {};
        if (!response.ok) throw errorFromStatus(response.status, body.error ?? `HTTP ${response.status}`);
        return body;
      } catch (err: any) {
        const error =
          err instanceof RankerError
            ? err
            : err?.name === "TimeoutError" || err?.name === "AbortError"
              ? new Timeout(`no answer within ${timeoutMs} ms`)
              : new Unavailable(`cannot reach ${this.baseUrl}: ${err?.cause?.code ?? err?.message ?? err}`);
        if (!error.retryable || attempt >= this.retries) throw error;
        const delay = Math.random() * Math.min(2000, this.backoffMs * 2 ** attempt);
        await new Promise((resolve) => setTimeout(resolve, delay));
      }
    }
  }

  async isReady(model: string = this.model): Promise<boolean> {
    try {
      const response = await fetch(`${this.baseUrl}/v2/models/${model}/ready`, { signal: AbortSignal.timeout(this.timeoutMs) });
      return response.status === 200;
    } catch {
      return false;
    }
  }

  /** Throws ApiMismatch unless `model` exposes query/texts/top_k -> indices/scores. */
  async checkApi(model: string = this.model): Promise<void> {
    const meta = await this.request(`/v2/models/${model}`, { method: "GET" }, this.timeoutMs);
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
    const { topK, model = this.model, timeoutMs = this.timeoutMs } = options;
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
        const body = await this.request(
          `/v2/models/${model}/infer`,
          { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ inputs }) },
          timeoutMs,
        );
        const out = Object.fromEntries((body.outputs as V2Tensor[]).map((t) => [t.name, t.data as number[]]));
        return out.indices.map((index, i) => ({ position: start + index, score: out.scores[i] }));
      }),
    );
    const merged = parts.flat().sort((a, b) => b.score - a.score || a.position - b.position);
    return merged.slice(0, topK ?? merged.length).map((m, r) => ({ id: all[m.position].id, text: all[m.position].text, score: m.score, rank: r + 1 }));
  }
}
