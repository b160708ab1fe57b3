// "Remember this browser" in a real browser: ticked at the second factor, the session binds to
// a WebCrypto key (the /_portcullis/bind interstitial); after signing out, the password alone
// brings the browser to /_portcullis/remembered, whose script proves the same key from
// IndexedDB, and the console opens with amr "pwd swk". A fresh browser context still gets the
// second-factor page.
import { test } from "node:test";
import assert from "node:assert/strict";
import { enrolDemoUser, launch, screenshot, signOut, startDemo, submitPassword as password, totp } from "./lib.mjs";

test("a remembered browser signs in with its password and its device key", { timeout: 120000 }, async () => {
  const demo = await startDemo();
  const browser = await launch();
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    const { secret } = await enrolDemoUser(page, demo);
    await page.waitForURL(`${demo.base}/`);
    await signOut(page, demo.base);

    // Second factor with "remember this browser" ticked (the next 30-second code: the
    // enrolment used this one).
    await password(page, demo);
    await page.waitForURL(/\/_portcullis\/mfa$/);
    await page.check("input[name=remember]");
    await page.fill("#code", totp(secret, Date.now() + 30000));
    await page.click("form[action='/_portcullis/mfa'] button[type=submit]");
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    await signOut(page, demo.base);

    // The password alone, then the device key proves itself.
    await password(page, demo);
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    assert.match(await page.textContent("#amr"), /pwd swk/);

    // Another browser with the same password: the second factor, as always.
    const other = await (await browser.newContext()).newPage();
    await password(other, demo);
    await other.waitForURL(/\/_portcullis\/mfa$/);
  } catch (e) {
    await screenshot(page, "remember-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});
