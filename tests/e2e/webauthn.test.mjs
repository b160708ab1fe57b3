// Security keys in a real browser: Chromium's virtual authenticator (DevTools WebAuthn domain)
// stands in for a USB key. A person enrols TOTP, adds a key on the account page, then signs in
// with password + key, and finally with the passkey alone; the console sees the
// phishing-resistant methods. The new-device notice of the first sign-in is in the outbox.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { enrolDemoUser, launch, screenshot, signOut, startDemo, withKey } from "./lib.mjs";

test("add a security key, then sign in with it and with the passkey alone", { timeout: 180000 }, async () => {
  const demo = await startDemo({ host: "localhost" });
  const browser = await launch();
  const { page } = await withKey(browser);
  try {

    // First sign-in: password and forced TOTP enrolment.
    await enrolDemoUser(page, demo);
    await page.waitForURL(`${demo.base}/`);

    // Add a key on the account page (the script un-hides the section).
    await page.goto(`${demo.base}/_portcullis/account`);
    await page.fill("#key-name", "Desk key");
    await page.click("[data-webauthn=register] [data-webauthn-start]");
    await page.waitForFunction(() => [...document.querySelectorAll("li.key strong")].some((e) => e.textContent === "Desk key"), null, { timeout: 30000 });

    // Password + key.
    await signOut(page, demo.base);
    await page.fill("#username", "demo@example.com");
    await page.fill("#password", demo.password);
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/mfa$/);
    // Keyboard users start where the page's way on is: the key's button has the focus.
    await page.waitForFunction(() => document.activeElement && document.activeElement.matches("[data-webauthn=second-factor] [data-webauthn-start]"));
    // After a wrong code the person is back in the code field, beside the message.
    await page.fill("#code", "000000");
    await page.click("form[action='/_portcullis/mfa'] button[type=submit]");
    await page.waitForSelector("#form-error");
    assert.equal(await page.evaluate(() => document.activeElement && document.activeElement.id), "code");
    await page.click("[data-webauthn=second-factor] [data-webauthn-start]");
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    assert.match(await page.textContent("#amr"), /pwd hwk/);

    // The passkey alone (discoverable credential, user verified).
    await signOut(page, demo.base);
    await page.click("[data-webauthn=passkey] [data-webauthn-start]");
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    assert.match(await page.textContent("#amr"), /hwk user/);

    // On a phone's width the account page, its sign-in history included, fits: nothing makes
    // the page scroll sideways.
    await page.setViewportSize({ width: 375, height: 800 });
    await page.goto(`${demo.base}/_portcullis/account`);
    assert.ok((await page.locator("tr.sign-in").count()) >= 3, "a history to show");
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `the account page is ${overflow}px wider than a 375px screen`);
    // Readable, not squeezed: each history row stacks its cells, and a short one is one line
    // (no word broken across lines).
    const cells = await page.evaluate(() =>
      [...document.querySelectorAll("tr.sign-in td[data-label=Result]")].map((td) => {
        const style = getComputedStyle(td);
        const line = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.5;
        return { lines: td.getBoundingClientRect().height / line, display: style.display };
      }),
    );
    assert.ok(cells.length >= 3 && cells.every((c) => c.display === "block" && c.lines < 1.9), JSON.stringify(cells));
    await page.setViewportSize({ width: 1280, height: 800 });

    // The first sign-in from this browser was a new device: the owner was told.
    const outbox = join(demo.dir, "outbox");
    const read = () =>
      readdirSync(outbox)
        .filter((f) => f.endsWith(".eml"))
        .map((f) => readFileSync(join(outbox, f), "utf8"));
    let mails = read();
    for (let i = 0; i < 50 && mails.length < 3; i++) {
      await new Promise((r) => setTimeout(r, 100));
      mails = read();
    }
    const signIns = mails.filter((m) => /Subject: New sign-in to your account/.test(m));
    assert.equal(signIns.length, 1, "one new-device notice, later sign-ins were from a known device");
    assert.ok(mails.some((m) => /Desk key/.test(m)), "the owner is told a key was added");
  } catch (e) {
    await screenshot(page, "webauthn-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});

/**
 * Signs the demo user in on a browser with a virtual key (`verifiesUser` as `withKey` takes
 * it), adds the key on the account page, and hands `then` the page once the attempt has an
 * outcome: the key listed, or the section's status saying why not. `name` names the failure
 * screenshot.
 */
async function addingAKey(name, demo, { verifiesUser = true } = {}, then) {
  const browser = await launch();
  const { page } = await withKey(browser, { verifiesUser });
  try {
    await enrolDemoUser(page, demo);
    await page.waitForURL(`${demo.base}/`);
    await page.goto(`${demo.base}/_portcullis/account`);
    await page.fill("#key-name", "New key");
    await page.click("[data-webauthn=register] [data-webauthn-start]");
    await page.waitForFunction(
      () =>
        [...document.querySelectorAll("li.key strong")].some((e) => e.textContent === "New key") ||
        /again|approved model|not support/i.test(document.querySelector("[data-webauthn=register] [data-webauthn-status]").textContent),
      null,
      { timeout: 30000 },
    );
    await then(page);
  } catch (e) {
    await screenshot(page, name);
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
}

const registerStatus = (page) => page.textContent("[data-webauthn=register] [data-webauthn-status]");

// Where a touch is enough after the password (`webauthn.user_verification = "preferred"`), a key
// without PIN or biometric registers in the real browser (the browser checks the options it is
// given before it asks the key) and then signs in after the password with a touch.
test("with a touch enough, a key without user verification registers and signs in", { timeout: 180000 }, async () => {
  const demo = await startDemo({ host: "localhost", env: { PORTCULLIS__WEBAUTHN__USER_VERIFICATION: "preferred" } });
  await addingAKey("webauthn-touch-failure", demo, { verifiesUser: false }, async (page) => {
    assert.doesNotMatch(await registerStatus(page), /does not support what is needed/);
    await signOut(page, demo.base);
    await page.fill("#username", "demo@example.com");
    await page.fill("#password", demo.password);
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/mfa$/);
    await page.click("[data-webauthn=second-factor] [data-webauthn-start]");
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    assert.match(await page.textContent("#amr"), /pwd hwk/);
  });
});

// Where attestation is required, a key the browser can use reaches the gateway and is judged
// there: Chromium's virtual key (no credProtect, attested by a certificate of its own) is
// refused as no approved model, with the gateway's words, not turned away by the browser
// before it is asked.
test("with attestation required, an unapproved key is refused by the gateway in its own words", { timeout: 180000 }, async () => {
  const demo = await startDemo({ host: "localhost" });
  // A vendor CA of our own, which vouches for no key here.
  const ca = join(demo.dir, "vendor-ca.pem");
  execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", join(demo.dir, "vendor-ca.key"), "-out", ca, "-days", "30", "-subj", "/CN=Vendor Root"], { stdio: "ignore" });
  demo.stop();
  const strict = await startDemo({
    host: "localhost",
    env: { PORTCULLIS__WEBAUTHN__ATTESTATION: "required", PORTCULLIS__WEBAUTHN__ATTESTATION_CA_FILES: JSON.stringify([ca]) },
  });
  await addingAKey("webauthn-attestation-failure", strict, {}, async (page) => {
    assert.match(await registerStatus(page), /could not prove that it is an approved model/);
  });
});

// Where keys must check their user (the default), a key that cannot is turned away by the
// browser without a reason; the page names the likely one.
test("a key without user verification, where it is required, is told why it may have failed", { timeout: 180000 }, async () => {
  const demo = await startDemo({ host: "localhost" });
  await addingAKey("webauthn-no-uv-failure", demo, { verifiesUser: false }, async (page) => {
    assert.match(await registerStatus(page), /cannot check a PIN or fingerprint/);
  });
});
