// fmnist's page. Served from the same origin as the API, under a Content-Security-Policy
// that allows only same-origin scripts and styles: nothing here is inline.
//
// Credentials: a sign-in form whose user name and password live in this script's memory
// only (never in storage or cookies). Every API call sets the Authorization header itself and
// uses `credentials: "omit"`: with the credentials mode "omit", the Fetch standard never asks
// the user for credentials on a 401, so the browser's own Basic-auth dialog cannot pop up
// over the form; the page shows its own message instead.
"use strict";

const MODEL = document.querySelector('meta[name="fmnist-model"]').content;
// Photos larger than this (longest side, px) or heavier than MAX_BYTES are scaled down here
// before upload: the model sees 28 x 28 pixels, and a phone photo is often 3-8 MB.
const MAX_SIDE = 1024;
const MAX_BYTES = 2 * 1024 * 1024;

const $ = (id) => document.getElementById(id);
let auth = null; // "Basic ..." while signed in
let readyTimer = null;

function basic(user, password) {
  // UTF-8, as the server's challenge announces (charset="UTF-8"); btoa alone takes Latin-1.
  const bytes = new TextEncoder().encode(`${user}:${password}`);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return "Basic " + btoa(bin);
}

function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (auth) headers.set("Authorization", auth);
  return fetch(path, { ...init, headers, credentials: "omit", cache: "no-store" });
}

function showError(text) {
  const e = $("error");
  e.textContent = text;
  e.hidden = !text;
}

function setStatus(text, bad) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("bad", !!bad);
}

/** A message for a failed response: the server's own JSON `error` where it has one. */
async function failure(resp) {
  let detail = "";
  try {
    detail = (await resp.json()).error || "";
  } catch (_) {
    /* not JSON */
  }
  // The server's messages start in lower case; here they follow a sentence.
  detail = detail.charAt(0).toUpperCase() + detail.slice(1);
  switch (resp.status) {
    case 401:
      return "Wrong user name or password.";
    case 429: {
      const after = resp.headers.get("retry-after");
      return `Too many attempts; try again${after ? ` in ${after} s` : " later"}.`;
    }
    case 413:
      return `This file is too large for the server. ${detail}`;
    case 415:
      return `The server cannot read this file as an image. ${detail}`;
    case 422:
      return `The image file is damaged or incomplete. ${detail}`;
    case 503:
      return "The server is not ready (it is starting, busy or shutting down). Try again in a moment.";
    default:
      return `The server answered ${resp.status}. ${detail}`;
  }
}

async function checkReady() {
  clearTimeout(readyTimer);
  try {
    const r = await fetch("/v2/health/ready", { cache: "no-store", credentials: "omit" });
    if (r.ok) {
      setStatus(`The server is ready. Model: ${MODEL}.`, false);
      return;
    }
    setStatus("The server is not ready yet (the model is loading or the server is shutting down). Checking again…", true);
  } catch (_) {
    setStatus("Cannot reach the server. Checking again…", true);
  }
  readyTimer = setTimeout(checkReady, 2000);
}

async function signIn(event) {
  event.preventDefault();
  showError("");
  const user = $("user").value;
  const password = $("password").value;
  if (!user || !password) {
    showError("Enter a user name and a password.");
    return;
  }
  auth = basic(user, password);
  let resp;
  try {
    resp = await api(`/v2/models/${encodeURIComponent(MODEL)}`);
  } catch (_) {
    auth = null;
    showError("Cannot reach the server.");
    return;
  }
  if (!resp.ok) {
    auth = null;
    showError(await failure(resp));
    $("password").focus();
    return;
  }
  $("password").value = "";
  $("who").textContent = user;
  $("login-form").hidden = true;
  $("signed-in").hidden = false;
  $("logout").focus();
}

function signOut() {
  auth = null;
  $("signed-in").hidden = true;
  $("login-form").hidden = false;
  $("result").hidden = true;
  $("user").focus();
}

/** Scales a large photo down (EXIF orientation applied, transparency onto white). */
async function shrink(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (_) {
    return file; // not decodable here: the server names the problem
  }
  const side = Math.max(bitmap.width, bitmap.height);
  if (side <= MAX_SIDE && file.size <= MAX_BYTES) {
    bitmap.close();
    return file;
  }
  const scale = Math.min(1, MAX_SIDE / side);
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return await new Promise((resolve) => canvas.toBlob((b) => resolve(b || file), "image/jpeg", 0.92));
}

/** Sends one image as a multipart `file` part and shows the answer. */
async function classify(blob, name) {
  showError("");
  if (!auth) {
    showError("Sign in first: predictions need the server's credentials.");
    $("user").focus();
    return;
  }
  const form = new FormData();
  form.append("file", blob, name);
  let resp;
  try {
    resp = await api("/predict?preview=true", { method: "POST", body: form });
  } catch (_) {
    showError("Cannot reach the server.");
    return;
  }
  if (!resp.ok) {
    $("result").hidden = true;
    showError(await failure(resp));
    if (resp.status === 401) signOut();
    if (resp.status === 503) checkReady();
    return;
  }
  const body = await resp.json();
  show(body.predictions[0]);
}

function show(p) {
  $("answer").textContent = p.class;
  $("confidence").textContent = `${(p.confidence * 100).toFixed(1)} %`;
  const seen = $("seen").getContext("2d");
  const img = seen.createImageData(28, 28);
  p.input.forEach((v, i) => {
    img.data.set([v, v, v, 255], i * 4);
  });
  seen.putImageData(img, 0, 0);
  const bars = $("bars");
  bars.replaceChildren();
  for (const [name, prob] of Object.entries(p.probabilities)) {
    const li = document.createElement("li");
    li.classList.toggle("top", name === p.class);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(prob * 100).toFixed(2)}%`; // CSSOM: allowed by the CSP
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(prob * 100).toFixed(1)} %`;
    li.append(label, track, pct);
    bars.append(li);
  }
  $("result").hidden = false;
}

async function photo(file) {
  if (!file) return;
  classify(await shrink(file), file.name || "pasted-image");
}

// ---- the drawing pad --------------------------------------------------------------------
const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let drawn = false;

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  drawn = false;
}

function padPoint(e) {
  const r = pad.getBoundingClientRect();
  return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
}

pad.addEventListener("pointerdown", (e) => {
  drawing = true;
  drawn = true;
  pad.setPointerCapture(e.pointerId);
  const [x, y] = padPoint(e);
  ink.strokeStyle = "#000";
  ink.lineWidth = 26;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  ink.moveTo(x, y);
  ink.lineTo(x, y);
  ink.stroke();
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const [x, y] = padPoint(e);
  ink.lineTo(x, y);
  ink.stroke();
});
for (const end of ["pointerup", "pointercancel"]) {
  pad.addEventListener(end, () => {
    drawing = false;
  });
}

$("clear").addEventListener("click", () => {
  clearPad();
  showError("");
});
$("classify-drawing").addEventListener("click", () => {
  if (!drawn) {
    showError("Draw something first.");
    return;
  }
  pad.toBlob((b) => classify(b, "drawing.png"), "image/png");
});

// ---- photos: choose, drop, paste --------------------------------------------------------
$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  // Cleared, so that choosing the same photo again (after signing in, say) is a new choice.
  e.target.value = "";
  photo(file);
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  photo(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.kind === "file");
  if (item) photo(item.getAsFile());
});

$("login-form").addEventListener("submit", signIn);
$("logout").addEventListener("click", signOut);
clearPad();
checkReady();
