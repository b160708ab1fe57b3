// A person signs in through headless Chromium: password, forced TOTP enrolment with a code the
// test computes, recovery codes, then the demo console shows the verified identity.
import { test } from "node:test";
import assert from "node:assert/strict";
import { launch, screenshot, signOut, startDemo, totp } from "./lib.mjs";

test("sign in with TOTP and reach the demo console", { timeout: 120000 }, async () => {
  const demo = await startDemo();
  const browser = await launch();
  const page = await browser.newPage();
  try {
    await page.goto(`${demo.base}/campaigns`);
    assert.match(new URL(page.url()).pathname, /^\/_portcullis\/login$/);
    assert.equal(new URL(page.url()).searchParams.get("next"), "/campaigns");

    // A wrong password first: a clear message, still on the sign-in page.
    await page.fill("#username", "demo@example.com");
    await page.fill("#password", "not-the-password");
    await page.click("button[type=submit]");
    assert.match(await page.textContent(".error"), /email or password is not right/);

    await page.fill("#username", "demo@example.com");
    await page.fill("#password", demo.password);
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/enrol\/totp$/);
    assert.ok(await page.locator(".qr svg").isVisible(), "QR code is shown");
    const secret = (await page.textContent("#totp-secret")).trim();

    // The console is out of reach until enrolment is confirmed.
    const early = await page.request.get(`${demo.base}/campaigns`, { maxRedirects: 0, headers: { accept: "text/html" } });
    assert.equal(early.status(), 303);

    await page.fill("#code", totp(secret));
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/recovery-codes$/);
    assert.equal(await page.locator("#recovery-codes li").count(), 10);
    await page.click("button[type=submit]");

    await page.waitForURL(`${demo.base}/campaigns`);
    assert.match(await page.textContent("h1"), /Campaigns/);
    await page.goto(`${demo.base}/`);
    assert.equal((await page.textContent("#email")).trim(), "demo@example.com");
    assert.match(await page.textContent("#amr"), /pwd otp/);

    // A page the demo console does not have says so, with a way back.
    const missing = await page.goto(`${demo.base}/no-such-page`);
    assert.equal(missing.status(), 404);
    assert.match(await page.textContent("body"), /no such page/);

    // The console refuses a request that did not come through the gateway.
    const direct = await page.request.get(`${demo.consoleBase}/`);
    assert.equal(direct.status(), 401);

    // Sign out, and the console is gone again.
    await signOut(page, demo.base);
    await page.goto(`${demo.base}/`);
    assert.match(new URL(page.url()).pathname, /^\/_portcullis\/login$/);
  } catch (e) {
    await screenshot(page, "login-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});
