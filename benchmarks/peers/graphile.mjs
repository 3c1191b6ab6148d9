// graphile-worker's side of `python -m benchmarks.peers`: a worker, a backlog filler and an
// enqueuer, for the graphile-worker installed under PEERS_NODE_PREFIX (see install.py). It
// connects with the libpq environment variables (PGHOST, PGUSER, PGDATABASE, ...).
//
//   node graphile.mjs fill {single,three} COUNT      queue COUNT jobs of the first task
//   node graphile.mjs work {single,three,latency}
//   node graphile.mjs enqueue                        one job per id read on stdin
//
// `work` runs one worker process configured as graphile-worker's performance page recommends
// (24 concurrent jobs, a pool of 25, local queue of 500, job completions batched with delay 0),
// prints `ready`, answers each `count` line on stdin with `count JOBS FINALS NOW FIRST LAST`
// (task calls, calls of the last stage, the time now, of the first call, of the last final call),
// in `latency` mode prints `started ID TIME` as each task starts, and stops at the end of stdin.
// `enqueue` prints `sent ID BEFORE AFTER` around each addJob (its commit included). Times are
// seconds since the epoch, as Python's time.time().

import { createRequire } from "node:module";
import path from "node:path";
import { performance } from "node:perf_hooks";
import readline from "node:readline";

const require = createRequire(path.resolve(process.env.PEERS_NODE_PREFIX, "package.json"));
const { run, makeWorkerUtils, Logger } = require("graphile-worker");
const { Pool } = require("pg");

const CHUNK = 5000;
const PRESET = {
  worker: {
    concurrentJobs: 24,
    maxPoolSize: 25,
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};
// Warnings and errors only, on stderr (stdout carries the answers): no line per job.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker ${level}: ${message}`);
});

// A pool with error handlers: an idle client's error is reported, not a crash.
const makePool = (max) => {
  const pool = new Pool({ max });
  const report = (error) => console.error(`graphile-worker pool: ${error.message}`);
  pool.on("error", report);
  pool.on("connect", (client) => client.on("error", report));
  return pool;
};
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const say = (line) => process.stdout.write(`${line}\n`);

async function fill(mode, count) {
  const pgPool = makePool(2);
  const utils = await makeWorkerUtils({ pgPool, logger });
  const identifier = mode === "single" ? "only" : "a";
  for (let start = 0; start < count; start += CHUNK) {
    const size = Math.min(CHUNK, count - start);
    await utils.addJobs(Array.from({ length: size }, () => ({ identifier, payload: {} })));
  }
  await utils.release();
  await pgPool.end();
}

async function work(mode) {
  const counter = { jobs: 0, finals: 0, first: 0, last: 0 };
  const hit = (final) => {
    const t = now();
    if (counter.jobs === 0) counter.first = t;
    counter.jobs += 1;
    if (final) {
      counter.finals += 1;
      counter.last = t;
    }
  };
  const taskLists = {
    single: { only: async () => hit(true) },
    // Chained as graphile-worker's users chain tasks: each task adds the next job.
    three: {
      a: async (_payload, helpers) => {
        await helpers.addJob("b", {});
        hit(false);
      },
      b: async (_payload, helpers) => {
        await helpers.addJob("c", {});
        hit(false);
      },
      c: async () => hit(true),
    },
    latency: {
      latency: async (payload) => {
        const started = now();
        say(`started ${payload.id} ${started}`);
      },
    },
  };
  const pgPool = makePool(PRESET.worker.maxPoolSize);
  const runner = await run({
    pgPool,
    logger,
    noHandleSignals: true,
    taskList: taskLists[mode],
    preset: PRESET,
  });
  say("ready");
  const lines = readline.createInterface({ input: process.stdin });
  lines.on("line", (line) => {
    if (line.trim() === "count") {
      say(`count ${counter.jobs} ${counter.finals} ${now()} ${counter.first} ${counter.last}`);
    }
  });
  lines.on("close", async () => {
    await runner.stop();
    await pgPool.end();
    process.exit(0);
  });
}

async function enqueue() {
  const pgPool = makePool(2);
  const utils = await makeWorkerUtils({ pgPool, logger });
  await utils.withPgClient((client) => client.query("SELECT 1"));
  say("ready");
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const id = line.trim();
    const before = now();
    await utils.addJob("latency", { id });
    say(`sent ${id} ${before} ${now()}`);
  }
  await utils.release();
  await pgPool.end();
}

const [command, mode, count] = process.argv.slice(2);
const done =
  command === "fill"
    ? fill(mode, Number(count))
    : command === "work"
      ? work(mode)
      : command === "enqueue"
        ? enqueue()
        : Promise.reject(new Error(`unknown command ${command}`));
done.catch((error) => {
  console.error(error);
  process.exit(1);
});
