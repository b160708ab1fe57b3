// A form sent while the session's proof is too old for it is kept while the person confirms it's
// them, then sent by itself: nothing typed is lost. After a proof, the "Confirmed" page goes on
// to the console page and leaves the history as it was.
import { test } from "node:test";
import assert from "node:assert/strict";
import { enrolDemoUser, launch, screenshot, startDemo, totp } from "./lib.mjs";

// The shortest proof a rule may ask for, so the test can outwait it.
const config = `
[[step_up]]
path = "/campaigns/send"
methods = ["POST"]
max_age = "30s"
`;

test("a form stopped for a step-up is sent after the proof, as it was typed", { timeout: 150000 }, async () => {
  const demo = await startDemo({ config });
  const browser = await launch();
  const page = await browser.newPage();
  try {
    const { secret } = await enrolDemoUser(page, demo);
    await page.waitForURL(`${demo.base}/`);
    await page.goto(`${demo.base}/campaigns/new`);
    await page.fill("#name", "Winter sale 2026");
    await page.fill("#recipients", "25000");
    // The proof from signing in grows too old for the rule.
    await new Promise((r) => setTimeout(r, 31000));
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/reauth\?/);
    assert.match(await page.textContent("#held-form"), /POST \/campaigns\/send/);
    assert.ok(await page.locator("form[action^='/_portcullis/held?id='] button[name=drop]").isVisible());
    await page.fill("#code", totp(secret));
    await page.click("form[action^='/_portcullis/reauth?'] button[type=submit]");
    // The held page sends it by itself; the console's answer is the campaign list.
    // (At the held page's own address: the console's answer to the form it sent.)
    await page.waitForFunction(() => /queued for sending/.test(document.body.textContent), null, { timeout: 30000 });
    assert.match(page.url(), /\/_portcullis\/held\?id=/);
    const body = await page.textContent("main");
    assert.match(body, /Campaign “Winter sale 2026” queued for sending/);
    assert.match(body, /Winter sale 2026\s*25000/);
    // Reloading the console's answer sends nothing twice.
    page.once("dialog", (d) => d.accept());
    const again = await page.reload();
    assert.equal(again.status(), 410);

    // After a proof, the "Confirmed" page goes on to the console page and is not left in the
    // history (Back skips it); where that address is a download, the page stays and says so.
    await page.goto(`${demo.base}/_portcullis/account`);
    await page.goto(`${demo.base}/_portcullis/reauth/done?next=%2Fcampaigns`);
    await page.waitForURL(`${demo.base}/campaigns`);
    await page.goBack();
    assert.equal(new URL(page.url()).pathname, "/_portcullis/account");
  } catch (e) {
    await screenshot(page, "step-up-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});
