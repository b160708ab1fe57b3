// Security keys and passkeys. No inline script (the gateway's CSP forbids it): pages mark a
// section with data-webauthn="register" | "second-factor" | "passkey" | "reauth" and data-csrf,
// and this module wires its [data-webauthn-start] button. The server keeps all ceremony state;
// this only carries the challenge to the authenticator and the answer back.

const API = "/_portcullis/webauthn";

// --- base64url <-> ArrayBuffer ------------------------------------------------------------

export function toBuffer(b64url) {
  const b64 = b64url.replace(/-/g, "+").replace(/_/g, "/");
  const padded = b64 + "===".slice((b64.length + 3) % 4);
  const bin = atob(padded);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out.buffer;
}

export function toBase64url(buf) {
  const bytes = new Uint8Array(buf);
  let bin = "";
  for (let i = 0; i < bytes.length; i++) bin += String.fromCharCode(bytes[i]);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// --- options from the server -> browser API -----------------------------------------------

// Credential lists (excludeCredentials, allowCredentials) carry ids as base64url.
function withBufferIds(list) {
  return list ? list.map((c) => ({ ...c, id: toBuffer(c.id) })) : list;
}

function creationOptions(o) {
  const pk = { ...o.publicKey, challenge: toBuffer(o.publicKey.challenge) };
  pk.user = { ...pk.user, id: toBuffer(pk.user.id) };
  pk.excludeCredentials = withBufferIds(pk.excludeCredentials);
  return { publicKey: pk };
}

function requestOptions(o) {
  const pk = { ...o.publicKey, challenge: toBuffer(o.publicKey.challenge) };
  pk.allowCredentials = withBufferIds(pk.allowCredentials);
  return { publicKey: pk };
}

// --- browser answers -> JSON for the server -----------------------------------------------

function credentialJson(cred, response) {
  return {
    id: cred.id,
    rawId: toBase64url(cred.rawId),
    type: cred.type,
    response,
    extensions: cred.getClientExtensionResults ? cred.getClientExtensionResults() : {},
  };
}

function registrationJson(cred) {
  const r = cred.response;
  return credentialJson(cred, {
    attestationObject: toBase64url(r.attestationObject),
    clientDataJSON: toBase64url(r.clientDataJSON),
    transports: typeof r.getTransports === "function" ? r.getTransports() : undefined,
  });
}

function assertionJson(cred) {
  const r = cred.response;
  return credentialJson(cred, {
    authenticatorData: toBase64url(r.authenticatorData),
    clientDataJSON: toBase64url(r.clientDataJSON),
    signature: toBase64url(r.signature),
    userHandle: r.userHandle ? toBase64url(r.userHandle) : null,
  });
}

// --- messages -------------------------------------------------------------------------------

export function explain(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" && err.userVerification === "required") {
    // The browser does not say why; a key that cannot check its user is one reason.
    return "The request was cancelled or timed out, or the key cannot check a PIN or fingerprint, " +
      "which is needed here. Press the button to try again, or use a key with a PIN or biometric set up.";
  }
  if (name === "NotAllowedError") {
    return "The request was cancelled or timed out. Press the button to try again.";
  }
  if (name === "AbortError") return "The request was cancelled. Press the button to try again.";
  if (name === "TimeoutError") return "The security key did not answer in time. Please try again.";
  if (name === "InvalidStateError") return "This key is already registered to your account.";
  if (name === "SecurityError") return "This address cannot use security keys. Contact support.";
  if (name === "NotSupportedError") return "This security key does not support what is needed here.";
  if (err && err.serverMessage) return err.serverMessage;
  return "Something went wrong. Please try again.";
}

/** The browser's ceremony; an error it ends with carries what the options asked of the key. */
async function ask(how, options) {
  const pk = (options && options.publicKey) || {};
  const userVerification = pk.userVerification || (pk.authenticatorSelection && pk.authenticatorSelection.userVerification);
  try {
    return how === "create"
      ? await navigator.credentials.create(creationOptions(options))
      : await navigator.credentials.get(requestOptions(options));
  } catch (err) {
    if (err && typeof err === "object") err.userVerification = userVerification;
    throw err;
  }
}

async function post(path, csrf, body, base) {
  const resp = await fetch((base || API) + path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body || {}),
  });
  let data = {};
  try {
    data = await resp.json();
  } catch (_) {
    data = {};
  }
  if (!resp.ok) {
    const e = new Error(data.message || "request failed");
    e.serverMessage = data.message || "The server refused the request. Please try again.";
    e.action = nextStep(data);
    throw e;
  }
  return data;
}

// The way on that a refusal names: the step-up it asks for, or the device check, which comes
// back to this page. Same-origin paths only.
export function nextStep(data) {
  const local = (p) => typeof p === "string" && p.startsWith("/") && !p.startsWith("//");
  if (local(data.reauth)) return { href: data.reauth, text: "Confirm it's you" };
  if (local(data.login)) return { href: data.login, text: "Sign in again" };
  if (local(data.bind)) {
    const u = new URL(data.bind, window.location.origin);
    u.searchParams.set("next", window.location.pathname + window.location.search);
    return { href: u.pathname + u.search, text: "Confirm this browser" };
  }
  return null;
}

// --- ceremonies -----------------------------------------------------------------------------

const flows = {
  // data-api on the section names another endpoint pair (an admin enrolling a key in person).
  async register(section, csrf) {
    const nameInput = section.querySelector("[data-webauthn-name]");
    const name = nameInput ? nameInput.value : "";
    const base = section.dataset.api;
    const start = await post("/register/start", csrf, { name }, base);
    const cred = await ask("create", start.options);
    return post("/register/finish", csrf, {
      ceremony: start.ceremony,
      credential: registrationJson(cred),
    }, base);
  },
  async reauth(section, csrf) {
    const start = await post("/reauth/start", csrf);
    const cred = await ask("get", start.options);
    return post("/reauth/finish", csrf, {
      ceremony: start.ceremony,
      credential: assertionJson(cred),
      next: section.dataset.next || "",
    });
  },
  async "second-factor"(section, csrf) {
    const start = await post("/authenticate/start", csrf);
    const cred = await ask("get", start.options);
    const remember = document.querySelector("input[data-remember]");
    return post("/authenticate/finish", csrf, {
      ceremony: start.ceremony,
      credential: assertionJson(cred),
      remember: !!(remember && remember.checked),
    });
  },
  async passkey(section, csrf) {
    const start = await post("/passkey/start", csrf);
    const cred = await ask("get", start.options);
    return post("/passkey/finish", csrf, {
      ceremony: start.ceremony,
      credential: assertionJson(cred),
      next: section.dataset.next || "",
    });
  },
};

function wire(section) {
  const kind = section.dataset.webauthn;
  const flow = flows[kind];
  const button = section.querySelector("[data-webauthn-start]");
  const status = section.querySelector("[data-webauthn-status]");
  if (!flow || !button) return;
  section.hidden = false;
  const say = (text) => {
    if (status) status.textContent = text;
  };
  if (!window.PublicKeyCredential || !navigator.credentials) {
    button.disabled = true;
    say("This browser cannot use security keys or passkeys. Use another method, or a current browser.");
    return;
  }
  button.addEventListener("click", async () => {
    button.disabled = true;
    say("Follow your browser's prompt: touch your security key or unlock your passkey.");
    try {
      const result = await flow(section, section.dataset.csrf || "");
      say("Done.");
      if (result && typeof result.redirect === "string" && result.redirect.startsWith("/") && !result.redirect.startsWith("//")) {
        window.location.assign(result.redirect);
      }
    } catch (err) {
      say(explain(err));
      if (err && err.action && status) {
        const a = document.createElement("a");
        a.href = err.action.href;
        a.textContent = err.action.text;
        status.append(" ", a);
      }
      button.disabled = false;
    }
  });
  // The key is the way on where a page asks for a second factor or a confirmation: focus goes
  // to it unless the page puts it elsewhere (the code field after a wrong code) or the person
  // is already somewhere else on the page.
  const elsewhere = document.querySelector("[autofocus]") || (document.activeElement && document.activeElement !== document.body);
  if ((kind === "second-factor" || kind === "reauth") && !elsewhere) {
    button.focus();
  }
}

document.querySelectorAll("[data-webauthn]").forEach(wire);
