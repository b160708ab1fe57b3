// The admin console in a real browser, with Chromium's virtual authenticators standing in for
// security keys: `portcullis admin bootstrap` prints a one-time link; through it the first admin
// sets a password and registers a key, opens the admin console, creates a customer and issues
// their enrolment link; the customer registers their own key through it and signs in with
// password + key to the console. An admin whose session was completed with a code only is
// sent to touch a key instead of being let in.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { BIN, enrolDemoUser, launch, screenshot, signOut, startDemo, withKey } from "./lib.mjs";

const PASSWORD = "a long private passphrase 42";

/** Runs the CLI on the demo's data; returns what it printed on stdout. */
function cli(demo, ...args) {
  return execFileSync(BIN, ["--config", join(demo.dir, "portcullis.toml"), ...args], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** Opens an enrolment link, sets the password, and registers the key of this context. */
async function enrolThroughLink(page, link, base) {
  await page.goto(link);
  await page.fill("#password", PASSWORD);
  await page.fill("#password2", PASSWORD);
  await page.click("button[type=submit]");
  await page.waitForURL(/\/_portcullis\/enrol\/totp$/);
  await page.click("[data-webauthn=register] [data-webauthn-start]");
  await page.waitForURL(/\/_portcullis\/recovery-codes$/, { timeout: 30000 });
  await page.click("button[type=submit]");
  await page.waitForURL(`${base}/`, { timeout: 30000 });
}

test("bootstrap an admin, enrol a customer by link, and refuse a code-only admin", { timeout: 240000 }, async () => {
  const demo = await startDemo({ host: "localhost" });
  const browser = await launch();
  const admin = await withKey(browser);
  const customer = await withKey(browser);
  let page = admin.page;
  try {
    const link = cli(demo, "admin", "bootstrap", "boss@example.com").trim();
    assert.match(link, /^http:\/\/localhost:\d+\/_portcullis\/enrol\?t=/);

    // The admin's link takes a security key only.
    await page.goto(link);
    // Password managers file the new password under the account's name.
    assert.equal(await page.inputValue("input[autocomplete=username]"), "boss@example.com");
    await page.fill("#password", PASSWORD);
    await page.fill("#password2", PASSWORD);
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/enrol\/totp$/);
    assert.equal(await page.locator("#totp-secret").count(), 0, "no authenticator app for an admin");
    await page.click("[data-webauthn=register] [data-webauthn-start]");
    await page.waitForURL(/\/_portcullis\/recovery-codes$/, { timeout: 30000 });
    await page.click("button[type=submit]");
    // An administrator's link leads on to the admin console: home with charts, then a new
    // customer and their enrolment link.
    await page.waitForURL(`${demo.base}/_portcullis/admin`, { timeout: 30000 });
    assert.match(await page.textContent("h1"), /What needs attention/);
    assert.equal(await page.locator("svg.chart").count(), 2);
    await page.goto(`${demo.base}/_portcullis/admin/users`);
    await page.fill("#email", "customer@example.com");
    await page.fill("#account", "acct-42");
    await page.click("form[method=post][action='/_portcullis/admin/users'] button[type=submit]");
    const customerLink = (await page.textContent("[data-enrolment-link]")).trim();
    assert.match(customerLink, /\/_portcullis\/enrol\?t=/);
    // The link is used once: the admin's page is the only place it ever appeared.

    // The customer registers their own key through the link, then signs in with password + key.
    page = customer.page;
    await enrolThroughLink(page, customerLink, demo.base);
    assert.equal((await page.textContent("#email")).trim(), "customer@example.com");
    await signOut(page, demo.base);
    await page.fill("#username", "customer@example.com");
    await page.fill("#password", PASSWORD);
    await page.click("button[type=submit]");
    await page.waitForURL(/\/_portcullis\/mfa$/);
    await page.click("[data-webauthn=second-factor] [data-webauthn-start]");
    await page.waitForURL(`${demo.base}/`, { timeout: 30000 });
    assert.match(await page.textContent("#amr"), /pwd hwk/);
    // A customer never reaches the admin console.
    const refused = await page.request.get(`${demo.base}/_portcullis/admin`, { headers: { accept: "application/json" }, maxRedirects: 0 });
    assert.equal(refused.status(), 403);

    // The admin's user list shows the customer; the audit trail names the admin.
    page = admin.page;
    await page.goto(`${demo.base}/_portcullis/admin/audit?event=user_created`);
    assert.match(await page.textContent("table.list"), /customer@example\.com[\s\S]*boss@example\.com/);
    // On a small phone's width (320px) the admin's tables stack their cells, each named by its column: the
    // customer's page (sessions, devices, events) and the audit trail fit the screen.
    await page.goto(`${demo.base}/_portcullis/admin/users?q=customer%40example.com`);
    const customerPage = await page.getAttribute("table.list a[href*='/_portcullis/admin/users/']", "href");
    await page.setViewportSize({ width: 320, height: 800 });
    for (const path of [customerPage, "/_portcullis/admin/users", "/_portcullis/admin", "/_portcullis/admin/audit"]) {
      await page.goto(`${demo.base}${path}`);
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert.ok(overflow <= 0, `${path} is ${overflow}px wider than a 320px screen`);
    }
    const label = await page.evaluate(() => getComputedStyle(document.querySelector("table.list td[data-label]"), "::before").content);
    assert.match(label, /When: /);
    // The home page's charts keep a readable size there: each scrolls within its frame and
    // opens at its right end, where the latest hours and days (and so this test's sign-ins) are.
    await page.goto(`${demo.base}/_portcullis/admin`);
    const charts = await page.evaluate(() =>
      [...document.querySelectorAll("figure.chart")].map((f) => {
        const svg = f.querySelector("svg.chart").getBoundingClientRect();
        const frame = f.getBoundingClientRect();
        return { width: svg.width, latestShown: svg.right <= frame.right + 1 && svg.right >= frame.right - 1 };
      }),
    );
    assert.ok(charts.length === 2 && charts.every((c) => c.width >= 500 && c.latestShown), JSON.stringify(charts));
    await page.setViewportSize({ width: 1280, height: 800 });

    // An admin who signed in with a code only (an account with an authenticator app, made an
    // administrator) is asked for a security key, not let in.
    const codeOnly = await browser.newContext();
    page = await codeOnly.newPage();
    await enrolDemoUser(page, demo);
    await page.waitForURL(`${demo.base}/`);
    cli(demo, "admin", "bootstrap", "demo@example.com");
    // (The gateway trusts its copy of an account record for a second.)
    await new Promise((r) => setTimeout(r, 1200));
    await page.goto(`${demo.base}/_portcullis/admin`);
    await page.waitForURL(/\/_portcullis\/reauth\?/);
    assert.equal(new URL(page.url()).searchParams.get("key"), "1");
    assert.match(await page.textContent("main"), /needs a security key, and none is registered/);
  } catch (e) {
    await screenshot(page, "admin-failure");
    throw e;
  } finally {
    await browser.close();
    demo.stop();
  }
});
