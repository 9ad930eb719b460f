// A non-Python client of lychee.rerank.v1, built only from the .proto file with
// @grpc/grpc-js + @grpc/proto-loader. It calls Rerank and RerankStream on a running server,
// checks that each ranking is well formed and that both calls agree, and prints the rankings
// as JSON so the Python test can compare them with the Python client's.
//
// usage: node client.js TARGET SPEC.json
//   SPEC = {"instruction": str, "query": str, "documents": [str, ...],
//           "image_document": {"png_base64": str, "text": str}, "chunk_bytes": int}
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function fail(message) {
  console.error(`node client: ${message}`);
  process.exit(1);
}

function loadService() {
  const definition = protoLoader.loadSync("lychee/rerank/v1/rerank.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  return pkg.lychee.rerank.v1.RerankService;
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function checkRanking(label, response, count) {
  const results = response.results;
  if (results.length !== count) fail(`${label}: expected ${count} results, got ${results.length}`);
  const seen = new Set();
  for (let i = 0; i < results.length; i++) {
    const r = results[i];
    if (!(r.score >= 0 && r.score <= 1)) fail(`${label}: score out of [0, 1]: ${r.score}`);
    if (seen.has(r.index)) fail(`${label}: duplicate index ${r.index}`);
    seen.add(r.index);
    if (i > 0) {
      const prev = results[i - 1];
      if (prev.score < r.score) fail(`${label}: not sorted by descending score`);
      if (prev.score === r.score && prev.index > r.index) fail(`${label}: tie not in input order`);
    }
  }
  if (response.usage.pairs !== count) fail(`${label}: usage.pairs ${response.usage.pairs} != ${count}`);
  return results.map((r) => ({ index: r.index, id: r.id, score: r.score }));
}

function unary(client, spec, docs) {
  const request = {
    instruction: spec.instruction,
    query: { text: spec.query },
    documents: docs,
    options: {},
  };
  return new Promise((resolve, reject) => {
    client.Rerank(request, { deadline: deadline(60) }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function stream(client, spec, textDocs, image) {
  return new Promise((resolve, reject) => {
    const call = client.RerankStream({ deadline: deadline(60) }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
    const count = textDocs.length + 1;
    call.write({ header: { instruction: spec.instruction, query: { text: spec.query }, document_count: count } });
    for (const doc of textDocs) {
      const bytes = Buffer.from(doc.text, "utf8");
      call.write({ item: { id: doc.id, text_bytes: bytes.length, image_bytes: 0 } });
      call.write({ chunk: { text: bytes } });
    }
    // The image document: its bytes split across several chunks.
    const text = Buffer.from(image.text, "utf8");
    call.write({
      item: { id: "img", text_bytes: text.length, image_bytes: image.bytes.length, image_media_type: "MEDIA_TYPE_PNG" },
    });
    for (let off = 0; off < image.bytes.length; off += spec.chunk_bytes) {
      call.write({ chunk: { image: image.bytes.subarray(off, off + spec.chunk_bytes) } });
    }
    call.write({ chunk: { text } });
    call.end();
  });
}

function badRequest(client) {
  // No documents: the server must answer INVALID_ARGUMENT, not hang or crash.
  return new Promise((resolve) => {
    client.Rerank({ query: { text: "q" }, documents: [] }, { deadline: deadline(30) }, (err) => resolve(err));
  });
}

async function main() {
  const [target, specPath] = process.argv.slice(2);
  if (!target || !specPath) fail("usage: node client.js TARGET SPEC.json");
  const spec = JSON.parse(fs.readFileSync(specPath, "utf8"));
  const Service = loadService();
  const client = new Service(target, grpc.credentials.createInsecure());

  const textDocs = spec.documents.map((text, i) => ({ id: `d${i}`, text }));
  const unaryDocs = textDocs.map((d) => ({ id: d.id, content: { text: d.text } }));
  const unaryResponse = await unary(client, spec, unaryDocs);
  const unaryRanking = checkRanking("Rerank", unaryResponse, textDocs.length);

  const image = { bytes: Buffer.from(spec.image_document.png_base64, "base64"), text: spec.image_document.text };
  const streamResponse = await stream(client, spec, textDocs, image);
  const streamRanking = checkRanking("RerankStream", streamResponse, textDocs.length + 1);

  // The text documents are scored identically whichever RPC carried them.
  for (const r of unaryRanking) {
    const s = streamRanking.find((x) => x.id === r.id);
    if (!s || Math.abs(s.score - r.score) > 1e-6) fail(`score of ${r.id} differs between Rerank and RerankStream`);
  }

  const err = await badRequest(client);
  if (!err || err.code !== grpc.status.INVALID_ARGUMENT) fail(`empty documents: expected INVALID_ARGUMENT, got ${err && err.code}`);

  client.close();
  process.stdout.write(JSON.stringify({ unary: unaryRanking, stream: streamRanking, bad_request_code: err.code }) + "\n");
}

main().catch((err) => fail(err && err.stack ? err.stack : String(err)));
