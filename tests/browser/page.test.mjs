// The web page in a real browser against a live fmnist-serve (scripts/browser.sh starts it).
// Debian's chromium, driven by playwright-core; accessibility by axe-core, run inside the page.
//
// env: FMNIST_URL, FMNIST_USER, FMNIST_PASSWORD, FMNIST_PID (the server, for the drain step),
//      CHROMIUM (default /usr/bin/chromium), OUT (screenshots; default ../../target/browser),
//      FMNIST_REPORT (optional: an evaluation report's index.html, rendered and checked too)
import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import { fileURLToPath, pathToFileURL } from "node:url";
import path from "node:path";
import assert from "node:assert/strict";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");
const base = process.env.FMNIST_URL;
const user = process.env.FMNIST_USER;
const password = process.env.FMNIST_PASSWORD;
const out = process.env.OUT || path.join(root, "target/browser");
mkdirSync(out, { recursive: true });
const axeSource = readFileSync(path.join(here, "node_modules/axe-core/axe.min.js"), "utf8");

let failed = 0;
async function step(name, fn) {
  const t = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - t} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.stack || e}`);
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
  ],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
const page = await context.newPage();
const problems = [];
page.on("console", (m) => {
  if (m.type() === "error" || m.type() === "warning") problems.push(`${m.type()}: ${m.text()}`);
});
page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
// The page never reaches beyond its own origin.
const foreign = [];
page.on("request", (r) => {
  if (!r.url().startsWith(base) && !r.url().startsWith("data:") && !r.url().startsWith("blob:")) foreign.push(r.url());
});

/** axe-core's violations on the page as it is now (source evaluated via the DevTools protocol,
 * which the page's CSP does not govern; the page itself stays under its policy). */
async function axe(label) {
  await page.evaluate(axeSource);
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const v = result.violations.map((x) => `${x.id} (${x.impact}): ${x.nodes.map((n) => n.target.join(" ")).join(", ")}`);
  assert.deepEqual(v, [], `axe violations at ${label}:\n${v.join("\n")}`);
}

const answer = () => page.locator("#answer").textContent();

/** Waits for the page's /predict call and returns it. */
function predictCall() {
  return page.waitForResponse((r) => r.url().startsWith(`${base}/predict`) && r.request().method() === "POST");
}

await step("the page loads under its CSP and says the server is ready", async () => {
  const resp = await page.goto(base + "/");
  assert.equal(resp.status(), 200);
  const csp = resp.headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe/);
  await page.locator("#status", { hasText: "ready" }).waitFor({ timeout: 10000 });
});

await step("axe-core: 0 violations at desktop width (signed out)", () => axe("1280 px, signed out"));

await step("a wrong password shows the page's message, not the browser's dialog", async () => {
  let dialog = false;
  page.once("dialog", () => (dialog = true));
  await page.fill("#user", user);
  await page.fill("#password", "not-the-password");
  const r = page.waitForResponse((r) => r.url().includes("/v2/models/"));
  await page.click("#login-form button[type=submit]");
  assert.equal((await r).status(), 401);
  await page.locator("#error", { hasText: "Wrong user name or password" }).waitFor();
  assert.equal(await page.locator("#signed-in").isHidden(), true);
  assert.equal(dialog, false);
});

await step("predicting before signing in says to sign in", async () => {
  await page.setInputFiles("#file", path.join(root, "fixtures/images/sneaker.jpg"));
  await page.locator("#error", { hasText: "Sign in first" }).waitFor();
});

await step("sign in with the keyboard only", async () => {
  await page.fill("#user", "");
  await page.fill("#password", "");
  await page.focus("#user");
  await page.keyboard.type(user);
  await page.keyboard.press("Tab");
  await page.keyboard.type(password);
  await page.keyboard.press("Enter");
  await page.locator("#signed-in").waitFor();
  assert.equal(await page.locator("#who").textContent(), user);
  assert.equal(await page.locator("#error").isHidden(), true);
});

for (const [file, expected] of [
  ["sneaker.jpg", "Sneaker"],
  ["trouser.png", "Trouser"],
]) {
  await step(`upload ${file}: the model says ${expected}, shows what it saw and ten bars`, async () => {
    const call = predictCall();
    await page.setInputFiles("#file", path.join(root, "fixtures/images", file));
    assert.equal((await call).status(), 200);
    await page.locator("#result").waitFor();
    assert.equal(await answer(), expected);
    assert.equal(await page.locator("#bars li").count(), 10);
    assert.equal(await page.locator("#bars li.top .name").textContent(), expected);
    // The preview canvas holds the server's 28x28 input, not a blank image.
    const lit = await page.evaluate(() => {
      // Read through a fresh canvas each time: repeated reads of one canvas make Chromium warn.
      const copy = document.createElement("canvas");
      copy.width = copy.height = 28;
      const g = copy.getContext("2d");
      g.drawImage(document.getElementById("seen"), 0, 0);
      const d = g.getImageData(0, 0, 28, 28).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++;
      return n;
    });
    assert.ok(lit > 20 && lit < 700, `preview has ${lit} light pixels`);
  });
}

await step("paste a photo (ankle-boot.webp)", async () => {
  const bytes = [...readFileSync(path.join(root, "fixtures/images/ankle-boot.webp"))];
  const call = predictCall();
  await page.evaluate((b) => {
    const dt = new DataTransfer();
    dt.items.add(new File([new Uint8Array(b)], "boot.webp", { type: "image/webp" }));
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true }));
  }, bytes);
  assert.equal((await call).status(), 200);
  await page.locator("#answer", { hasText: "Ankle boot" }).waitFor();
});

await step("a large photo dropped on the page is downsized before upload", async () => {
  // A 4000x3000 photo made in the browser from the trouser fixture: PNG, several MB.
  // Chromium does not hand file-backed request bodies to Playwright, so the test watches the
  // page's own fetch for the size of the multipart file it sends.
  await page.evaluate(() => {
    const fetch = window.fetch;
    window.fetch = (url, init) => {
      if (init && init.body instanceof FormData) {
        window.__sentBytes = [...init.body.values()].reduce((n, v) => n + (v.size || 0), 0);
      }
      return fetch(url, init);
    };
  });
  const call = predictCall();
  const original = await page.evaluate(async (bytes) => {
    const img = await createImageBitmap(new Blob([new Uint8Array(bytes)], { type: "image/png" }));
    const c = document.createElement("canvas");
    c.width = 4000;
    c.height = 3000;
    const g = c.getContext("2d");
    g.fillStyle = "#fff";
    g.fillRect(0, 0, c.width, c.height);
    g.drawImage(img, 500, 200, 2600, 2600);
    // Sensor noise, so the PNG is as heavy as a real photo.
    const d = g.getImageData(0, 0, c.width, c.height);
    for (let i = 0; i < d.data.length; i += 4) {
      const n = (Math.random() - 0.5) * 12;
      d.data[i] += n; d.data[i + 1] += n; d.data[i + 2] += n;
    }
    g.putImageData(d, 0, 0);
    const blob = await new Promise((r) => c.toBlob(r, "image/png"));
    const dt = new DataTransfer();
    dt.items.add(new File([blob], "big.png", { type: "image/png" }));
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
    return blob.size;
  }, [...readFileSync(path.join(root, "fixtures/images/trouser.png"))]);
  assert.equal((await call).status(), 200);
  const body = await page.evaluate(() => window.__sentBytes);
  assert.ok(original > 4 * 1024 * 1024, `the test photo is ${original} bytes`);
  assert.ok(body > 0 && body < original / 4, `uploaded ${body} of ${original} bytes`);
  await page.locator("#answer", { hasText: "Trouser" }).waitFor();
});

await step("replay the committed drawing (trouser): the class shown, the request on the server", async () => {
  const strokes = JSON.parse(readFileSync(path.join(root, "fixtures/drawings/trouser.json"), "utf8")).strokes;
  await page.click("#clear");
  const box = await page.locator("#pad").boundingBox();
  const at = ([x, y]) => [box.x + (x * box.width) / 280, box.y + (y * box.height) / 280];
  for (const stroke of strokes) {
    await page.mouse.move(...at(stroke[0]));
    await page.mouse.down();
    for (const p of stroke.slice(1)) await page.mouse.move(...at(p), { steps: 4 });
    await page.mouse.up();
  }
  const call = predictCall();
  await page.click("#classify-drawing");
  const resp = await call;
  assert.equal(resp.status(), 200);
  // What the server answered is what the page shows.
  const served = (await resp.json()).predictions[0].class;
  await page.locator("#answer", { hasText: "Trouser" }).waitFor();
  assert.equal(served, "Trouser");
  await page.screenshot({ path: path.join(out, "page-desktop.png"), fullPage: true });
});

await step("axe-core: 0 violations at desktop width (with a result)", () => axe("1280 px, result"));

await step("a file that is not an image gets the server's 415 message", async () => {
  const call = predictCall();
  await page.setInputFiles("#file", { name: "notes.png", mimeType: "image/png", buffer: Buffer.from("these are not pixels\n") });
  assert.equal((await call).status(), 415);
  await page.locator("#error", { hasText: "cannot read this file as an image" }).waitFor();
});

await step("a truncated JPEG gets the server's 422 message", async () => {
  const jpeg = readFileSync(path.join(root, "fixtures/images/sneaker.jpg"));
  const call = predictCall();
  await page.setInputFiles("#file", { name: "cut.jpg", mimeType: "image/jpeg", buffer: jpeg.subarray(0, jpeg.length / 2) });
  assert.equal((await call).status(), 422);
  await page.locator("#error", { hasText: "damaged or incomplete" }).waitFor();
});

await step("readable at 360 px: no horizontal scrolling, axe-core 0 violations", async () => {
  await page.setViewportSize({ width: 360, height: 800 });
  const wide = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(wide <= 360, `page is ${wide} px wide`);
  await axe("360 px");
  await page.screenshot({ path: path.join(out, "page-360.png"), fullPage: true });
});

await step("a server that is shutting down: the page says it is not ready", async () => {
  // SIGTERM starts the drain (lame duck): readiness answers 503 for FMNIST_DRAIN_DELAY_SECS.
  process.kill(Number(process.env.FMNIST_PID), "SIGTERM");
  await page.reload();
  await page.locator("#status", { hasText: "not ready" }).waitFor({ timeout: 5000 });
});

await step("no console errors or warnings, no request beyond the origin", async () => {
  // Chromium logs each non-2xx fetch as "Failed to load resource"; the steps above made
  // 401, 415, 422 and 503 on purpose, and each is asserted where it happens.
  const expected = /Failed to load resource: the server responded with a status of (401|415|422|503)/;
  const left = problems.filter((p) => !expected.test(p));
  assert.deepEqual(left, []);
  assert.deepEqual(foreign, []);
});

// The evaluation report (make report), opened from disk in its own page.
const report = process.env.FMNIST_REPORT;
if (report) {
  await step("the evaluation report renders: every picture loads, axe-core 0 violations", async () => {
    const r = await context.newPage();
    const errors = [];
    r.on("console", (m) => m.type() === "error" && errors.push(m.text()));
    r.on("pageerror", (e) => errors.push(e.message));
    await r.goto(pathToFileURL(path.resolve(root, report)).href, { waitUntil: "load" });
    const images = await r.evaluate(() =>
      [...document.images].map((i) => ({ src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0 })),
    );
    assert.ok(images.length >= 5, `${images.length} images`);
    assert.deepEqual(images.filter((i) => !i.ok), [], "images that did not load");
    await r.evaluate(axeSource);
    const result = await r.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
    const v = result.violations.map((x) => `${x.id}: ${x.nodes.map((n) => n.target.join(" ")).join(", ")}`);
    assert.deepEqual(v, [], `axe violations in the report:\n${v.join("\n")}`);
    assert.deepEqual(errors, []);
    await r.screenshot({ path: path.join(out, "report.png"), fullPage: true });
    await r.close();
  });
}

await browser.close();
console.log(failed ? `browser: ${failed} step(s) failed` : "browser: all steps passed");
console.log(`screenshots: ${out}/page-desktop.png, ${out}/page-360.png${report ? `, ${out}/report.png` : ""}`);
process.exit(failed ? 1 : 0);
