// Reserve+Commit pairs offered open loop on AdmitStream, from a process that costs the machine
// little CPU (the Python load generator takes about a third of the benchmark's two cores).
//
// usage: node admission_load.js TARGET TOKEN PROTO_ROOT RATE SECONDS BUDGETS STREAMS
// Prints one JSON line: achieved pairs/s, Reserve and pair p50/p99 (ms), denied, errors by kind,
// and the CPU this process used (cores).
'use strict';
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const [target, token, protoRoot, ...numbers] = process.argv.slice(2);
const [rate, seconds, budgets, streamCount] = numbers.map(Number);
const definition = loader.loadSync('lodestar/usage/v1/usage.proto', {
  includeDirs: [protoRoot], keepCase: true, longs: String, defaults: false, oneofs: true,
});
const { BudgetService } = grpc.loadPackageDefinition(definition).lodestar.usage.v1;
const metadata = new grpc.Metadata();
metadata.add('authorization', `Bearer ${token}`);

const waiting = new Map();
let nextRequestId = 1;
const streams = Array.from({ length: streamCount }, () => {
  const client = new BudgetService(target, grpc.credentials.createInsecure(), {
    'grpc.use_local_subchannel_pool': 1, // one connection per stream, as separate gateways
  });
  const stream = client.AdmitStream(metadata);
  stream.on('data', (response) => {
    const settle = waiting.get(response.request_id);
    waiting.delete(response.request_id);
    if (settle) settle(response);
  });
  stream.on('error', (error) => {
    console.error(`stream ended: ${error.code} ${error.details}`);
    process.exit(1);
  });
  return stream;
});

function admit(stream, call) {
  return new Promise((settle) => {
    const id = String(nextRequestId++);
    waiting.set(id, settle);
    stream.write({ request_id: id, calls: [call], timeout: { seconds: 5 } });
  });
}

const result = { reserveMs: [], pairMs: [], denied: 0, errors: {} };
const failed = (kind) => { result.errors[kind] = (result.errors[kind] || 0) + 1; };
const elapsedMs = (since) => Number(process.hrtime.bigint() - since) / 1e6;

async function pair(i) {
  const stream = streams[i % streams.length];
  const began = process.hrtime.bigint();
  const reserved = await admit(stream, {
    reserve: { project: `adm-${i % budgets}`, estimated_cost_micros: 100 },
  });
  const reserveMs = elapsedMs(began);
  const answer = reserved.error ? reserved : reserved.results[0];
  if (answer.error) return failed(`Reserve ${answer.error.code}`);
  if (!answer.reserve.granted) { result.denied += 1; return undefined; }
  const committed = await admit(stream, {
    commit: { reservation_id: answer.reserve.reservation_id, actual_cost_micros: 50 },
  });
  const commitAnswer = committed.error ? committed : committed.results[0];
  if (commitAnswer.error) return failed(`Commit ${commitAnswer.error.code}`);
  result.reserveMs.push(reserveMs);
  result.pairMs.push(elapsedMs(began));
  return undefined;
}

const sleep = (ms) => new Promise((wake) => { setTimeout(wake, ms); });

async function openLoop(pairsPerSecond, total) {
  const began = performance.now();
  const pairs = [];
  for (let i = 0; i < total; i += 1) {
    const delay = began + (i * 1000) / pairsPerSecond - performance.now();
    if (delay > 1) await sleep(delay);
    pairs.push(pair(i));
  }
  await Promise.all(pairs);
  return (performance.now() - began) / 1000;
}

function percentile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return +sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))].toFixed(1);
}

(async () => {
  await openLoop(100, 100); // warm-up
  Object.assign(result, { reserveMs: [], pairMs: [], denied: 0, errors: {} });
  const cpuBefore = process.cpuUsage();
  const took = await openLoop(rate, Math.floor(rate * seconds));
  const cpu = process.cpuUsage(cpuBefore);
  console.log(JSON.stringify({
    pairs_per_second: Math.round(result.pairMs.length / took),
    reserve_p50_ms: percentile(result.reserveMs, 0.5),
    reserve_p99_ms: percentile(result.reserveMs, 0.99),
    pair_p50_ms: percentile(result.pairMs, 0.5),
    pair_p99_ms: percentile(result.pairMs, 0.99),
    denied: result.denied,
    errors: result.errors,
    cores: +((cpu.user + cpu.system) / 1e6 / took).toFixed(2),
  }));
  streams.forEach((stream) => stream.end());
  process.exit(0);
})();
