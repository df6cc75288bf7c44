// Runs against a real rankserve tritonserver: RANKSERVE_URL=http://127.0.0.1:PORT npm test
import assert from "node:assert/strict";
import { test } from "node:test";
import { ApiMismatch, BadRequest, queryMostlyUnknown, RankerClient, Timeout, Unavailable } from "../src/index.js";

const url = process.env.RANKSERVE_URL;
const skip = url ? false : "set RANKSERVE_URL to a running rankserve server";
const texts = ["Larkin Salon Chair | Massage Chairs", "Oak Dining Table | Dining Tables", "Gray Rug | Area Rugs", "salon chair cover"];

test("ranks with ids preserved, best first, topK honoured", { skip }, async () => {
  const client = new RankerClient(url!);
  await client.checkApi();
  assert.equal(await client.isReady(), true);
  const items = texts.map((t, i) => [`sku-${i}`, t] as [string, string]);
  const all = await client.rank("salon chair", items);
  assert.deepEqual(all.map((r) => r.rank), [1, 2, 3, 4]);
  assert.deepEqual([...all.map((r) => r.id)].sort(), ["sku-0", "sku-1", "sku-2", "sku-3"]);
  for (const r of all) assert.equal(r.text, texts[Number(String(r.id).slice(4))]);
  const scores = all.map((r) => r.score);
  assert.deepEqual(scores, [...scores].sort((a, b) => b - a));
  const top2 = await client.rank("salon chair", items, { topK: 2 });
  assert.deepEqual(top2.map((r) => r.id), all.slice(0, 2).map((r) => r.id));
});

test("chunked ranking equals one call", { skip }, async () => {
  const many = Array.from({ length: 300 }, (_, i) => ({ id: i, text: `${texts[i % texts.length]} model ${i}` }));
  const whole = await new RankerClient(url!).rank("salon chair", many, { topK: 40 });
  const chunked = await new RankerClient(url!, { chunkSize: 37 }).rank("salon chair", many, { topK: 40 });
  assert.deepEqual(chunked.map((r) => r.id), whole.map((r) => r.id));
  chunked.forEach((r, i) => assert.ok(Math.abs(r.score - whole[i].score) <= 1e-5));
});

test("bad input is a BadRequest and the server keeps serving", { skip }, async () => {
  const client = new RankerClient(url!);
  await assert.rejects(client.rank("sofa", ["bad\u0000text"]), BadRequest);
  await assert.rejects(client.rank("sofa", []), BadRequest);
  await assert.rejects(client.rank("sofa", ["gray sofa"], { topK: 2 }), /only 1 items/);
  assert.equal((await client.rank("sofa", ["gray sofa"])).length, 1);
});

test("timeouts, a server that is down, and a model that is not a ranker", { skip }, async () => {
  const many = Array.from({ length: 1000 }, (_, i) => `${texts[i % texts.length]} ${i}`);
  await assert.rejects(new RankerClient(url!).rank("sofa", many, { timeoutMs: 5 }), Timeout);
  const started = Date.now();
  await assert.rejects(new RankerClient("http://127.0.0.1:1", { retries: 2, backoffMs: 20 }).rank("sofa", ["x"]), Unavailable);
  assert.ok(Date.now() - started < 5000);
  await assert.rejects(new RankerClient(url!).checkApi("tokenize"), ApiMismatch);
});

test("rank on a model that is not a ranker is an ApiMismatch, as in the Python SDK", { skip }, async () => {
  for (const model of ["tokenize", "rank", "postprocess"]) {
    await assert.rejects(new RankerClient(url!, { model }).rank("sofa", ["gray sofa"]), ApiMismatch, model);
    await assert.rejects(new RankerClient(url!).rank("sofa", ["gray sofa"], { model }), ApiMismatch, model);
  }
  await assert.rejects(new RankerClient(url!).rank("sofa", ["gray sofa"], { model: "no_such_model" }), BadRequest);
  // without the check, an answer lacking indices and scores is still an ApiMismatch, not a TypeError
  await assert.rejects(new RankerClient(url!, { checkApi: false }).rank("sofa", ["gray sofa"], { model: "tokenize" }), ApiMismatch);
  const client = new RankerClient(url!);
  let metadata = 0;
  const send = (client as any).send.bind(client);
  (client as any).send = (method: string, path: string, ...rest: unknown[]) => {
    if (method === "GET") metadata++;
    return send(method, path, ...rest);
  };
  await client.rank("sofa", ["gray sofa"]);
  await client.rank("sofa", ["gray sofa"]);
  assert.equal(metadata, 1); // checked once per model
});

test("the result carries the unknown-token counts: a Chinese query is mostly unknown, an English one is not", { skip }, async () => {
  const chinese = await new RankerClient(url!, { chunkSize: 2 }).rank("天蓝色抱枕", [...texts, "😀 pillow"]);
  assert.equal(chinese.length, 5);
  assert.deepEqual([chinese.tokenCounts!.queryUnknown, chinese.tokenCounts!.queryTokens, chinese.tokenCounts!.textsUnknown], [4, 5, 1]);
  assert.equal(queryMostlyUnknown(chinese.tokenCounts!), true);
  const english = await new RankerClient(url!).rank("salon chair", texts);
  assert.deepEqual([english.tokenCounts!.queryUnknown, english.tokenCounts!.queryTokens, english.tokenCounts!.textsUnknown], [0, 2, 0]);
  assert.ok(english.tokenCounts!.textsTokens > 10 && !queryMostlyUnknown(english.tokenCounts!));
});

test("a long list goes out at most chunkConcurrency chunks at a time, merged in order", { skip }, async () => {
  const many = Array.from({ length: 300 }, (_, i) => ({ id: i, text: `${texts[i % texts.length]} model ${i}` }));
  const whole = await new RankerClient(url!).rank("salon chair", many, { topK: 40 });
  const client = new RankerClient(url!, { chunkSize: 20, chunkConcurrency: 3 });
  let running = 0;
  let most = 0;
  const send = (client as any).send.bind(client);
  (client as any).send = async (...args: unknown[]) => {
    most = Math.max(most, ++running);
    try {
      return await send(...args);
    } finally {
      running--;
    }
  };
  const chunked = await client.rank("salon chair", many, { topK: 40 }); // 15 chunks
  assert.equal(most, 3);
  assert.deepEqual(chunked.map((r) => r.id), whole.map((r) => r.id));
  assert.equal(new RankerClient(url!).chunkConcurrency, 4);
});
