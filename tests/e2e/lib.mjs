// Shared helpers for the browser tests: free ports, starting the real binary, TOTP, Chromium.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, mkdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { chromium } from "playwright-core";

export const BIN = process.env.PORTCULLIS_BIN || resolve("../../target/debug/portcullis");

export async function freePort() {
  return (await freePorts(1))[0];
}

/** `n` distinct free ports: all held open until every one is known, so no two are the same. */
export async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i++) {
      const s = createServer();
      servers.push(s);
      await new Promise((ok, fail) => {
        s.once("error", fail);
        s.listen(0, "127.0.0.1", ok);
      });
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((ok) => s.close(() => ok()))));
  }
}

/**
 * Starts `portcullis demo` on free ports; resolves once it prints the demo password. With
 * `host: "localhost"` the public URL uses that name (security keys need a host name); `env` adds
 * configuration overrides (`PORTCULLIS__SECTION__KEY`); `config` a configuration file's text.
 */
export async function startDemo(options = {}) {
  // A port found free can be taken by another process before the demo binds it: try again.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startDemoOnce(options);
    } catch (e) {
      if (attempt >= 3 || !String(e.message).includes("Address already in use")) throw e;
    }
  }
}

async function startDemoOnce({ host = "127.0.0.1", env = {}, config = null } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "portcullis-e2e-"));
  const [port, consolePort] = await freePorts(2);
  const args = ["demo", "--data-dir", dir, "--listen", `127.0.0.1:${port}`, "--console-listen", `127.0.0.1:${consolePort}`];
  // A configuration file of the test's (TOML), given as `portcullis --config FILE demo …`.
  if (config !== null) {
    const file = join(dir, "test-config.toml");
    writeFileSync(file, config);
    args.unshift("--config", file);
  }
  if (host !== "127.0.0.1") args.push("--public-url", `http://${host}:${port}/`);
  const child = spawn(BIN, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PORTCULLIS_LOG: "warn", ...env },
  });
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  const password = await new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`demo did not start: ${out}\n${err}`)), 60000);
    child.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/password: (\S+)/);
      if (m && out.includes("note:")) {
        clearTimeout(timer);
        ok(m[1]);
      }
    });
    child.once("exit", (code) => fail(new Error(`demo exited with ${code}: ${out}\n${err}`)));
  });
  return { base: `http://${host}:${port}`, consoleBase: `http://127.0.0.1:${consolePort}`, password, dir, stop: () => child.kill("SIGTERM") };
}

function base32Decode(s) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0, value = 0;
  const out = [];
  for (const ch of s.replace(/=+$/, "").toUpperCase()) {
    const v = alphabet.indexOf(ch);
    if (v < 0) throw new Error(`bad base32 character ${ch}`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

/** RFC 6238 TOTP (SHA-1, 6 digits, 30 s) of a base32 secret at `time` (ms). */
export function totp(secretBase32, time = Date.now()) {
  const counter = Buffer.alloc(8);
  counter.writeBigUInt64BE(BigInt(Math.floor(time / 1000 / 30)));
  const mac = createHmac("sha1", base32Decode(secretBase32)).update(counter).digest();
  const offset = mac[mac.length - 1] & 0x0f;
  const bin = mac.readUInt32BE(offset) & 0x7fffffff;
  return String(bin % 1_000_000).padStart(6, "0");
}

/** Debian's Chromium, headless, with a fresh temporary profile (playwright-core makes one per launch). */
export async function launch() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
  });
}


/** Saves a screenshot of `page` into a folder it prints, for looking at a failure. */
export async function screenshot(page, name) {
  const dir = resolve("test-results");
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true }).catch(() => {});
  console.log(`screenshot: ${file}`);
}

/**
 * First sign-in of the demo user on `page`: password, TOTP enrolment with a computed code,
 * recovery codes confirmed. Resolves once the browser is on its way to the console.
 */
/** The demo user's password on the sign-in page (the answer's next page is the caller's). */
export async function submitPassword(page, demo) {
  await page.goto(`${demo.base}/_portcullis/login`);
  await page.fill("#username", "demo@example.com");
  await page.fill("#password", demo.password);
  await page.click("button[type=submit]");
}

/** Signs out through the confirmation form. */
export async function signOut(page, base) {
  await page.goto(`${base}/_portcullis/logout`);
  await page.click("button[type=submit]");
  await page.waitForURL(/\/_portcullis\/login/);
}

/**
 * The demo user's first sign-in: password, authenticator app, recovery codes saved. Returns the
 * app's secret (base32) and the recovery codes shown.
 */
export async function enrolDemoUser(page, demo) {
  await submitPassword(page, demo);
  await page.waitForURL(/\/_portcullis\/enrol\/totp$/);
  const secret = (await page.textContent("#totp-secret")).trim();
  await page.fill("#code", totp(secret));
  await page.click("button[type=submit]");
  await page.waitForURL(/\/_portcullis\/recovery-codes$/);
  const recovery = await page.$$eval("#recovery-codes code", (cs) => cs.map((c) => c.textContent.trim()));
  await page.click("button[type=submit]");
  return { secret, recovery };
}

/**
 * A browser context with its own virtual security key (Chromium's virtual authenticator, a USB
 * key that can keep discoverable credentials). With `verifiesUser: false` the key has no PIN or
 * biometric: a touch is all it gives.
 */
export async function withKey(browser, { verifiesUser = true } = {}) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  await cdp.send("WebAuthn.enable");
  await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: {
      protocol: "ctap2",
      transport: "usb",
      hasResidentKey: true,
      hasUserVerification: verifiesUser,
      isUserVerified: verifiesUser,
      automaticPresenceSimulation: true,
    },
  });
  return { context, page };
}
