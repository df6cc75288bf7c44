// Retries, the retry budget and status-first classification, without a server: a local HTTP listener answers as a gateway
// in front of the server would (its own pages and statuses; no Triton here). Run by tests/e2e/test_typescript_sdk.py.
// `checkApi: false` where a test is about the inference call: every request here gets the same answer.
import assert from "node:assert/strict";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";
import {
  BadRequest, errorFromStatus, inOrder, Overloaded, RankerClient, RequestTooLarge, RetryBudget, RetryState, ServerError, Timeout,
  Unavailable,
} from "../src/index.js";

const NGINX_413 = "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/** A listener answering every request with one status, headers and body; counts the requests. */
async function gateway(status: number, body: string, headers: Record<string, string> = {}) {
  const seen = { requests: 0 };
  const server = http.createServer((req, res) => {
    req.resume();
    req.on("end", () => {
      seen.requests++;
      res.writeHead(status, { ...headers, "Content-Length": Buffer.byteLength(body) });
      res.end(body);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { seen, url, close: () => new Promise((resolve) => server.close(resolve)) };
}

test("a gateway's HTML 413 is RequestTooLarge at once, not a retried Unavailable", async () => {
  const g = await gateway(413, NGINX_413, { "Content-Type": "text/html" });
  const retries: number[] = [];
  const client = new RankerClient(g.url, { onRetry: (_e, n) => retries.push(n), checkApi: false });
  try {
    await assert.rejects(client.rank("sofa", ["gray sofa"]), (err: any) => err instanceof RequestTooLarge && err instanceof BadRequest && /too large/.test(err.message));
    assert.equal(g.seen.requests, 1);
    assert.deepEqual(retries, []);
  } finally {
    client.close();
    await g.close();
  }
});

test("a body that is not JSON or not an object is an error of its status, never a retried 'cannot reach'", async () => {
  for (const [status, body, kind] of [[404, "null", BadRequest], [413, "42", RequestTooLarge], [200, "<html>ok</html>", ServerError], [200, "null", ServerError]] as const) {
    const g = await gateway(status, body);
    const client = new RankerClient(g.url, { backoffMs: 1 });
    try {
      await assert.rejects(client.checkApi(), (err: any) => err instanceof kind && !err.retryable && !/cannot reach/.test(err.message));
      assert.equal(g.seen.requests, 1);
    } finally {
      client.close();
      await g.close();
    }
  }
});

test("status first: 4xx are never retried whatever the body; 429 and a gateway's 503 are Overloaded", () => {
  assert.ok(errorFromStatus(400, "Exceeds maximum queue size") instanceof BadRequest);
  assert.ok(!(errorFromStatus(404, "<html>", false) instanceof Unavailable));
  assert.ok(errorFromStatus(413, "<html>", false) instanceof RequestTooLarge);
  assert.ok(errorFromStatus(429, "slow down") instanceof Overloaded);
  assert.ok(errorFromStatus(503, "<html>503</html>", false) instanceof Overloaded);
  assert.ok(errorFromStatus(503, "in ensemble 'ranker', Exceeds maximum queue size") instanceof Overloaded);
  const stopping = errorFromStatus(503, "the rank stage is stopping: retry");
  assert.ok(stopping instanceof Unavailable && !(stopping instanceof Overloaded));
  assert.ok(errorFromStatus(502, "<html>502</html>", false) instanceof Unavailable);
  assert.ok(errorFromStatus(500, "Stub process 'rank_0_0' is not healthy.") instanceof Unavailable);
  assert.ok(errorFromStatus(500, "internal error (KeyError)") instanceof ServerError);
  assert.ok(errorFromStatus(504, "<html>", false) instanceof Timeout);
});

test("a shed call is retried a few times, then the budget stops retrying (before: 4 attempts per call)", async () => {
  const g = await gateway(429, JSON.stringify({ error: "rate limited" }));
  const client = new RankerClient(g.url, { overloadBackoffMs: 1, checkApi: false });
  try {
    for (let i = 0; i < 20; i++) await assert.rejects(client.rank("sofa", ["gray sofa"]), Overloaded);
    assert.ok(g.seen.requests <= 24, `${g.seen.requests} requests for 20 calls`); // 10 tokens, retries while above 5
    assert.ok(client.retryBudget!.throttled >= 15);
  } finally {
    client.close();
    await g.close();
  }
});

test("Retry-After is honoured; a long one is not waited for", async () => {
  const g = await gateway(503, "", { "Retry-After": "0.2" });
  const delays: number[] = [];
  const client = new RankerClient(g.url, { onRetry: (_e, _n, d) => delays.push(d), checkApi: false });
  try {
    await assert.rejects(client.rank("sofa", ["gray sofa"]), (err: any) => err instanceof Overloaded && err.retryAfterMs === 200);
    assert.equal(g.seen.requests, 3);
    assert.ok(delays.length === 2 && delays.every((d) => d >= 200 && d <= 221), String(delays));
  } finally {
    client.close();
    await g.close();
  }
  const long = await gateway(429, "{}", { "Retry-After": "3600" });
  const patient = new RankerClient(long.url, { checkApi: false });
  try {
    await assert.rejects(patient.rank("sofa", ["gray sofa"]), (err: any) => err instanceof Overloaded && err.retryAfterMs === 3_600_000);
    assert.equal(long.seen.requests, 1);
  } finally {
    patient.close();
    await long.close();
  }
});

test("the budget as gRPC's retry throttling; overload waits longer; a refused connection costs no token", async () => {
  const budget = new RetryBudget(10, 0.5);
  const state = new RetryState({ retries: 0, backoffMs: 0, overloadRetries: 100, overloadBackoffMs: 0 }, budget);
  const allowed = Array.from({ length: 8 }, () => state.delayAfter(new Overloaded("shed")) !== undefined);
  assert.deepEqual(allowed, [true, true, true, true, false, false, false, false]);
  assert.equal(budget.tokens, 2);
  for (let i = 0; i < 7; i++) budget.recordSuccess();
  assert.equal(budget.tokens, 5.5);
  const defaults = new RankerClient("http://127.0.0.1:1");
  assert.deepEqual([defaults.retries, defaults.backoffMs, defaults.overloadRetries, defaults.overloadBackoffMs], [3, 100, 2, 500]);
  assert.deepEqual([defaults.retryBudget!.maxTokens, defaults.retryBudget!.tokenRatio, defaults.chunkConcurrency], [10, 0.1, 4]);
  assert.deepEqual([0, 12].map((retries) => new RankerClient("http://127.0.0.1:1", { retries }).overloadRetries), [0, 2]); // 0: none at all
  const fresh = new RetryState(defaults, defaults.retryBudget);
  const shed = [0, 1, 2].map(() => fresh.delayAfter(new Overloaded("Exceeds maximum queue size")));
  assert.ok(shed[0]! >= 250 && shed[0]! <= 500 && shed[1]! >= 500 && shed[1]! <= 1000 && shed[2] === undefined, String(shed));
  await assert.rejects(new RankerClient("http://127.0.0.1:1", { backoffMs: 1, retryBudget: defaults.retryBudget, checkApi: false }).rank("sofa", ["x"]), Unavailable);
  assert.equal(defaults.retryBudget!.tokens, 7); // the three shed attempts above; the 4 refused connections cost nothing
  defaults.close();
});

test("inOrder keeps the order and never runs more than its limit at once", async () => {
  let running = 0;
  let most = 0;
  const out = await inOrder([5, 1, 4, 2, 3, 0, 6], 3, async (ms) => {
    most = Math.max(most, ++running);
    await new Promise((resolve) => setTimeout(resolve, ms * 3));
    running--;
    return ms * 10;
  });
  assert.deepEqual(out, [50, 10, 40, 20, 30, 0, 60]);
  assert.equal(most, 3);
});

test("several addresses: a retry goes to the next one, and new calls skip a server that refused for a while", async () => {
  const body = JSON.stringify({ outputs: [{ name: "indices", datatype: "INT32", shape: [1], data: [0] }, { name: "scores", datatype: "FP32", shape: [1], data: [1.5] }] });
  const g = await gateway(200, body, { "Content-Type": "application/json" });
  const closed = http.createServer();
  await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve));
  const refused = (closed.address() as AddressInfo).port;
  await new Promise((resolve) => closed.close(resolve)); // nothing listens there now: connections are refused
  const retries: string[] = [];
  const client = new RankerClient(`http://127.0.0.1:${refused},${g.url.slice("http://".length)}`, { onRetry: (e) => retries.push(e.constructor.name), checkApi: false });
  try {
    assert.deepEqual(client.addresses.all, [`http://127.0.0.1:${refused}`, g.url]);
    for (let i = 0; i < 4; i++) assert.equal((await client.rank("sofa", ["gray sofa"]))[0].score, 1.5);
    assert.deepEqual(retries, ["Unavailable"]); // the first call met the refusing server once; the next ones went elsewhere
    assert.equal(g.seen.requests, 4);
  } finally {
    client.close();
    await g.close();
  }
});
