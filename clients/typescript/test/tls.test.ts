// Runs through the TLS gateway (nginx: TLS + bearer token) in front of a real rankserve tritonserver, from
// tests/e2e/test_gateway.py: RANKSERVE_TLS_URL=https://127.0.0.1:PORT RANKSERVE_TOKEN=... RANKSERVE_CA=ca.pem
// RANKSERVE_OTHER_CA=unrelated-ca.pem node --test dist/test/tls.test.js
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { BadRequest, RankerClient, RequestTooLarge, TlsError, Unauthenticated } from "../src/index.js";

const url = process.env.RANKSERVE_TLS_URL;
const token = process.env.RANKSERVE_TOKEN ?? "";
const skip = url ? false : "set RANKSERVE_TLS_URL, RANKSERVE_TOKEN, RANKSERVE_CA and RANKSERVE_OTHER_CA (a gateway in front of rankserve)";
const ca = () => readFileSync(process.env.RANKSERVE_CA!);
const texts = ["Larkin Salon Chair | Massage Chairs", "Oak Dining Table | Dining Tables", "Gray Rug | Area Rugs", "salon chair cover"];
const auth = () => ({ Authorization: `Bearer ${token}` });

test("over https with the CA and the token it ranks", { skip }, async () => {
  const client = new RankerClient(url!, { headers: auth(), tls: { ca: ca() } });
  try {
    await client.checkApi();
    assert.equal(await client.isReady(), true);
    const ranked = await client.rank("salon chair", texts.map((t, i) => [`sku-${i}`, t] as [string, string]));
    assert.deepEqual(ranked.map((r) => r.rank), [1, 2, 3, 4]);
    const chunked = await client.rank("salon chair", texts.map((t, i) => [`sku-${i}`, t] as [string, string]), { topK: 2 });
    assert.deepEqual(chunked.map((r) => r.id), ranked.slice(0, 2).map((r) => r.id));
  } finally {
    client.close();
  }
});

test("no token or a wrong one is Unauthenticated, not retried; a call's headers add to and replace the client's", { skip }, async () => {
  const anonymous = new RankerClient(url!, { tls: { ca: ca() }, retries: 3, backoffMs: 2000 });
  const started = Date.now();
  await assert.rejects(anonymous.checkApi(), Unauthenticated);
  await assert.rejects(anonymous.rank("sofa", ["gray sofa"]), /bearer token/);
  assert.ok(Date.now() - started < 1500, "a refused credential must not be retried with backoff");
  assert.equal(await anonymous.isReady(), false);
  assert.equal((await anonymous.rank("sofa", ["gray sofa"], { headers: auth() })).length, 1);
  anonymous.close();
  const client = new RankerClient(url!, { headers: auth(), tls: { ca: ca() } });
  assert.equal((await client.rank("sofa", ["gray sofa"], { headers: { "X-Request-Tag": "per-call" } })).length, 1);
  await assert.rejects(client.rank("sofa", ["gray sofa"], { headers: { authorization: "Bearer wrong" } }), Unauthenticated);
  await assert.rejects(new RankerClient(url!, { headers: { Authorization: "Bearer wrong" }, tls: { ca: ca() } }).checkApi(), Unauthenticated);
  client.close();
});

test("a server certificate the client does not trust is a TlsError, not retried", { skip }, async () => {
  for (const tls of [{}, { ca: readFileSync(process.env.RANKSERVE_OTHER_CA!) }]) {
    const client = new RankerClient(url!, { headers: auth(), tls, retries: 3, backoffMs: 2000 });
    const started = Date.now();
    await assert.rejects(client.rank("sofa", ["gray sofa"]), (err: unknown) => err instanceof TlsError && /tls\.ca/.test(err.message));
    assert.ok(Date.now() - started < 1500);
    client.close();
  }
  assert.throws(() => new RankerClient(url!.replace("https://", "http://"), { tls: { ca: ca() } }), /https/);
});

test("a body over the gateway's 16 MiB cap: its HTML 413 is RequestTooLarge at once, not retried", { skip }, async () => {
  const retries: number[] = [];
  const client = new RankerClient(url!, { headers: auth(), tls: { ca: ca() }, onRetry: (_e, n) => retries.push(n) });
  const huge = Array.from({ length: 1000 }, (_, i) => `${"gray sofa ".repeat(1800)} ${i}`); // ~18 MB of JSON in one request
  try {
    await assert.rejects(client.rank("sofa", huge), (err: unknown) => err instanceof RequestTooLarge && err instanceof BadRequest && /HTTP 413/.test(err.message));
    assert.deepEqual(retries, []);
    assert.equal((await client.rank("sofa", ["gray sofa"])).length, 1); // the gateway and the server keep serving
  } finally {
    client.close();
  }
});
