// Device binding in a real browser (Debian's Chromium has no DBSC, so this is the WebCrypto
// fallback): the session keeps working past several bound-cookie lifetimes, each renewed by the
// interstitial with the key in IndexedDB; the same cookies copied into a fresh browser context
// (no key) are refused.
import { test } from "node:test";
import assert from "node:assert/strict";
import { enrolDemoUser, launch, screenshot, startDemo } from "./lib.mjs";

// A short bound-cookie lifetime so the test outlives several of them.
const TTL_SECONDS = 5;
const pause = (ms) => new Promise((r) => setTimeout(r, ms));
const pastLifetime = () => pause(TTL_SECONDS * 1000 + 500);

test("a bound session survives its cookie's lifetime; copied cookies are refused", { timeout: 120000 }, async () => {
  const demo = await startDemo({ env: { PORTCULLIS__BINDING__BOUND_COOKIE_TTL: `${TTL_SECONDS}s` } });
  const browser = await launch();
  const owner = await browser.newContext();
  const page = await owner.newPage();
  let thiefPage;
  try {
    await enrolDemoUser(page, demo);
    // The first navigation after sign-in binds the session (through the interstitial).
    await page.waitForURL(`${demo.base}/`);
    assert.equal((await page.textContent("#email")).trim(), "demo@example.com");
    const names = (await owner.cookies()).map((c) => c.name);
    assert.ok(names.includes("portcullis-bound"), `bound cookie set: ${names}`);

    // Keep browsing past several lifetimes: each expiry is renewed by proving the key again.
    for (const path of ["/campaigns", "/"]) {
      await pastLifetime();
      await page.goto(`${demo.base}${path}`);
      await page.waitForURL(`${demo.base}${path}`);
      assert.equal(new URL(page.url()).pathname, path);
    }
    assert.equal((await page.textContent("#email")).trim(), "demo@example.com");

    // A form sent after the proof expired (filled in slowly) is not forwarded without a proof,
    // nor lost: held while the browser proves itself again, then sent as it was typed.
    await page.goto(`${demo.base}/campaigns/new`);
    await page.fill("#name", "Typed slowly");
    await page.fill("#recipients", "4321");
    await pastLifetime();
    await page.click("button[type=submit]");
    // (At the held page's own address: the console's answer to the form it sent.)
    await page.waitForFunction(() => /queued for sending/.test(document.body.textContent), null, { timeout: 30000 });
    assert.match(page.url(), /\/_portcullis\/held\?id=/);
    const sent = await page.textContent("main");
    assert.match(sent, /Campaign “Typed slowly” queued for sending/);
    assert.match(sent, /Typed slowly\s*4321/);

    // Malware copies every cookie into another browser profile.
    const copied = await owner.cookies();
    const thief = await browser.newContext();
    await thief.addCookies(copied);
    thiefPage = await thief.newPage();
    await pastLifetime();
    await thiefPage.goto(`${demo.base}/campaigns`);
    await thiefPage.waitForSelector("[data-binding-error]:not([hidden])");
    assert.match(await thiefPage.textContent("[data-binding-error]"), /could not prove/);
    assert.match(new URL(thiefPage.url()).pathname, /^\/_portcullis\/bind$/);
    const direct = await thiefPage.request.get(`${demo.base}/`, { headers: { accept: "application/json" }, maxRedirects: 0 });
    assert.notEqual(direct.status(), 200, "no console for the copy");

    // The owner's browser keeps working.
    await page.goto(`${demo.base}/`);
    await page.waitForURL(`${demo.base}/`);
    assert.equal((await page.textContent("#email")).trim(), "demo@example.com");
  } catch (e) {
    await screenshot(page, "binding-owner-failure");
    if (thiefPage) await screenshot(thiefPage, "binding-copy-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});
