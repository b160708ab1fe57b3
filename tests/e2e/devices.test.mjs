// A known device is its device cookie together with the key its browser kept: the owner's
// browser signing in again is not reported as a new device, even when two of its tabs bind the
// new session at the same moment (one of them on a slow link); its cookies copied into another
// browser (without the key) are reported when that browser's session binds.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { enrolDemoUser, launch, screenshot, signOut, startDemo, submitPassword as password, totp } from "./lib.mjs";

const pause = (ms) => new Promise((r) => setTimeout(r, ms));

async function code(page, value) {
  await page.waitForURL(/\/_portcullis\/mfa$/);
  await page.fill("#code", value);
  await page.click("form[action='/_portcullis/mfa'] button[type=submit]");
}

// The new-device notices in the demo's outbox, once the mail worker has written what is due.
async function newDeviceMails(demo, atLeast) {
  const outbox = join(demo.dir, "outbox");
  const read = () =>
    readdirSync(outbox)
      .filter((f) => f.endsWith(".eml"))
      .map((f) => readFileSync(join(outbox, f), "utf8"))
      .filter((m) => /Subject: New sign-in to your account/.test(m));
  let mails = read();
  for (let i = 0; i < 60 && mails.length < atLeast; i++) {
    await pause(100);
    mails = read();
  }
  // Anything more would have been queued with the sign-in: give the worker a moment.
  await pause(1500);
  return read();
}

test("the owner's browser stays its device, two tabs at once included; a copy does not", { timeout: 120000 }, async () => {
  const demo = await startDemo();
  const browser = await launch();
  const context = await browser.newContext();
  const page = await context.newPage();
  try {
    // First sign-in: enrolment, and the one new-device notice.
    const { secret, recovery } = await enrolDemoUser(page, demo);
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    assert.equal((await newDeviceMails(demo, 1)).length, 1);

    // Signed out and in again, the new session bound by two tabs at once, the first one's
    // registration held on a slow link.
    await signOut(page, demo.base);
    await page.route("**/_portcullis/bind/register", async (route) => {
      await pause(1500);
      await route.continue();
    });
    await password(page, demo);
    await code(page, totp(secret, Date.now() + 30000));
    await page.waitForURL(/\/_portcullis\/bind/);
    const second = await context.newPage();
    await second.goto(`${demo.base}/_portcullis/bind?next=%2F`);
    await Promise.all([page.waitForURL(`${demo.base}/`, { timeout: 30000 }), second.waitForURL(`${demo.base}/`, { timeout: 30000 })]);
    await page.unroute("**/_portcullis/bind/register");
    assert.equal((await newDeviceMails(demo, 1)).length, 1, "the owner's own browser is not a new device");

    // The cookies copied into another browser: a new device once its session binds.
    const copy = await browser.newContext();
    await copy.addCookies(await context.cookies());
    const thief = await copy.newPage();
    await signOut(thief, demo.base);
    await password(thief, demo);
    // (A recovery code: the app's next code is still some seconds away.)
    await code(thief, recovery[0]);
    await thief.waitForURL(`${demo.base}/`, { timeout: 30000 });
    const mails = await newDeviceMails(demo, 2);
    assert.equal(mails.length, 2, "the copy is reported");
  } catch (e) {
    await screenshot(page, "devices-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});
