// Device binding for browsers without Device Bound Session Credentials. The gateway's
// interstitial page (/_portcullis/bind) loads this module. It keeps a non-extractable ECDSA
// P-256 key in IndexedDB (the device's, replaced at each registration the gateway accepts, which
// the old key signs too, so the gateway knows the browser for the device it was) and signs the
// server's single-use challenge with it in the same proof format DBSC uses (a JWS with typ
// "dbsc+jwt" and the challenge as jti; the first proof carries the public key). The gateway answers with a short-lived bound cookie and
// the page continues to where the user was going. The private key never leaves WebCrypto.

const section = document.querySelector("[data-binding]");
const DB = "portcullis-binding";
const STORE = "keys";

function b64url(bytes) {
  let bin = "";
  for (const b of new Uint8Array(bytes)) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const enc = (obj) => b64url(new TextEncoder().encode(JSON.stringify(obj)));

function openDb() {
  return new Promise((ok, fail) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => ok(req.result);
    req.onerror = () => fail(req.error);
  });
}

async function withStore(mode, fn) {
  const db = await openDb();
  try {
    return await new Promise((ok, fail) => {
      const tx = db.transaction(STORE, mode);
      const req = fn(tx.objectStore(STORE));
      tx.oncomplete = () => ok(req && req.result);
      tx.onerror = () => fail(tx.error);
    });
  } finally {
    db.close();
  }
}

// A session's key is kept under the session's id from before its registration is sent (a reload
// meanwhile still finds it); once the gateway accepts it, it is also the device's key, under
// DEVICE, and the keys of earlier sessions go.
const DEVICE = "device";

const putKey = (name, pair) => withStore("readwrite", (s) => s.put(pair, name));

async function accepted(session, pair) {
  const names = await withStore("readonly", (s) => s.getAllKeys());
  await withStore("readwrite", (s) => {
    for (const name of names || []) if (name !== session && name !== DEVICE) s.delete(name);
    return s.put(pair, DEVICE);
  });
}

const loadKey = (session) => withStore("readonly", (s) => s.get(session));
// The key the gateway last accepted from this browser: what proves it is the device its device
// cookie names (and, for a remembered device, what stands in for the second factor). A browser
// from before the DEVICE entry kept one key under its session's id.
async function deviceKey() {
  const kept = await withStore("readonly", (s) => s.get(DEVICE));
  if (kept) return kept;
  const all = await withStore("readonly", (s) => s.getAll());
  return all && all.length ? all[0] : undefined;
}

async function proof(privateKey, header, challenge) {
  const input = `${enc(header)}.${enc({ jti: challenge })}`;
  const sig = await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, privateKey, new TextEncoder().encode(input));
  return `${input}.${b64url(sig)}`;
}

async function post(path, body, base = "/_portcullis/bind") {
  const r = await fetch(`${base}/${path}`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": section.dataset.csrf },
    body: JSON.stringify(body),
  });
  let json = {};
  try {
    json = await r.json();
  } catch {
    json = {};
  }
  return { status: r.status, json };
}

// A browser with DBSC registers a key of its own (in the TPM) as soon as the sign-in answer
// offers it; that key is the better one, so a fresh session waits this long for it first.
const DBSC_GRACE_MS = 1000;

async function attempt(first) {
  let ch = await post("challenge", {});
  if (first && ch.status === 200 && ch.json.purpose === "register") {
    await new Promise((r) => setTimeout(r, DBSC_GRACE_MS));
    ch = await post("challenge", {});
  }
  if (ch.status !== 200) return ch;
  const { challenge, purpose, method, session } = ch.json;
  // Bound through DBSC by the browser itself (its registration won): nothing to do here.
  if (method === "dbsc") return { status: 200, json: {} };
  if (purpose === "register") {
    // The key the gateway last accepted from this browser signs the same challenge: it shows
    // the gateway that this is the device its device cookie names, not a copy of the cookie.
    // (Another tab registering at the same moment does not change it: a new key becomes the
    // device's only once accepted.)
    const kept = await deviceKey();
    const previous = kept ? await proof(kept.privateKey, { alg: "ES256", typ: "dbsc+jwt" }, challenge) : null;
    const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"]);
    const { kty, crv, x, y } = await crypto.subtle.exportKey("jwk", pair.publicKey);
    await putKey(session, pair);
    const p = await proof(pair.privateKey, { alg: "ES256", typ: "dbsc+jwt", jwk: { kty, crv, x, y } }, challenge);
    const r = await post("register", { proof: p, previous });
    if (r.status === 200) await accepted(session, pair);
    return r;
  }
  // A session signed in by a remembered device is bound to the key an earlier session stored.
  const pair = (await loadKey(session)) || (await deviceKey());
  // Without the key this browser cannot prove anything; the gateway counts that.
  const p = pair ? await proof(pair.privateKey, { alg: "ES256", typ: "dbsc+jwt" }, challenge) : null;
  return post("refresh", { proof: p });
}

// Proven: on to the page asked for. The page says so first, with its link: a download (a list
// export) is saved without leaving it.
function onward(delay) {
  const status = section.querySelector("[data-binding-status]");
  section.querySelector("[data-binding-continue]").hidden = false;
  // A form that was not passed on: the person continues when ready, to send it again.
  if (section.hasAttribute("data-not-sent")) {
    status.textContent = "This browser is confirmed.";
    return;
  }
  status.textContent = "This browser is confirmed. Continuing…";
  setTimeout(() => location.replace(section.dataset.next || "/"), delay);
}

function show(message) {
  section.querySelector("[data-binding-status]").hidden = true;
  const e = section.querySelector("[data-binding-error]");
  e.textContent = message;
  e.hidden = false;
}

async function run() {
  try {
    let r = await attempt(true);
    // A challenge can be used up by a parallel tab; one more try with a new one.
    if (r.status === 409 && r.json.error === "challenge_stale") r = await attempt(false);
    // Bound a moment ago by the browser's own DBSC registration: its cookie is on its way.
    if (r.status === 409 && r.json.error === "already_bound") {
      onward(500);
      return;
    }
    if (r.status === 200) {
      onward(0);
      return;
    }
    show(r.json.message || `The device check failed (${r.status}). Sign in again.`);
  } catch (err) {
    show(`This browser cannot keep a device key (${err && err.name ? err.name : "error"}). Sign in again with a current browser that keeps site data.`);
  }
}

// A remembered device after the password: prove the kept key; on any failure the page offers
// the second factor (the gateway has already switched the sign-in to it).
async function remembered() {
  const base = "/_portcullis/remembered";
  try {
    const pair = await deviceKey();
    const ch = await post("challenge", {}, base);
    if (ch.status !== 200) return show(ch.json.message || "Sign in again.");
    const p = pair ? await proof(pair.privateKey, { alg: "ES256", typ: "dbsc+jwt" }, ch.json.challenge) : null;
    const r = await post("finish", { proof: p }, base);
    if (r.status === 200 && typeof r.json.redirect === "string" && r.json.redirect.startsWith("/") && !r.json.redirect.startsWith("//")) {
      location.replace(r.json.redirect);
      return;
    }
    show(r.json.message || "This browser could not prove it is the remembered device. Use your second factor instead.");
  } catch (err) {
    show("This browser could not prove it is the remembered device. Use your second factor instead.");
  }
}

// The status line speaks of a proof only where script runs to make it (hidden otherwise, so
// the page without script shows only why it cannot go on).
if (section) section.querySelector("[data-binding-status]").hidden = false;
if (section && section.dataset.binding === "remembered") remembered();
else if (section) run();
