// Installed by tests/playground/test_playground.py into the playground page before Rank:
// records the bodies the page POSTs to /v1/rerank*, slows the progress stream to one event per
// `delayMs` (arguments[0]) so a screenshot can catch the bar part-way, and records every value
// the progress bar's aria-valuenow takes (a MutationObserver).
const delayMs = arguments[0];
const pg = { bodies: [], values: [], delayMs };
window.__pg = pg;
const realFetch = window.fetch.bind(window);
window.fetch = async (input, init) => {
  const url = typeof input === "string" ? input : input.url;
  if (url.includes("/v1/rerank") && init && typeof init.body === "string") pg.bodies.push({ url, body: init.body });
  const response = await realFetch(input, init);
  if (!(response.headers.get("content-type") || "").includes("text/event-stream")) return response;
  const reader = response.body.getReader();
  const enc = new TextEncoder();
  const dec = new TextDecoder();
  let buf = "";
  const slowed = new ReadableStream({
    async pull(controller) {
      for (;;) {
        const at = buf.indexOf("\n\n");
        if (at >= 0) {
          const ev = buf.slice(0, at + 2);
          buf = buf.slice(at + 2);
          await new Promise((r) => setTimeout(r, pg.delayMs));
          controller.enqueue(enc.encode(ev));
          return;
        }
        const { value, done } = await reader.read();
        if (done) {
          if (buf) controller.enqueue(enc.encode(buf));
          controller.close();
          return;
        }
        buf += dec.decode(value, { stream: true });
      }
    },
  });
  return new Response(slowed, { status: response.status, statusText: response.statusText, headers: response.headers });
};
const bar = document.getElementById("progress");
new MutationObserver((records) => {
  // Every value aria-valuenow took, in order: each record's old value is the previous one's new.
  const nows = records.filter((r) => r.attributeName === "aria-valuenow");
  for (let i = 0; i < nows.length; i += 1) {
    const value = i + 1 < nows.length ? nows[i + 1].oldValue : bar.getAttribute("aria-valuenow");
    pg.values.push([Number(value), Number(bar.getAttribute("aria-valuemax")), bar.getAttribute("aria-valuetext")]);
  }
}).observe(bar, { attributes: true, attributeOldValue: true, attributeFilter: ["aria-valuenow"] });
