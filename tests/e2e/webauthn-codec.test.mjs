// static/webauthn.js without a browser: base64url conversion both ways and the messages shown
// for the errors browsers raise. The ceremonies themselves are driven by the Rust tests.
import { test } from "node:test";
import assert from "node:assert/strict";

globalThis.document = { querySelectorAll: () => [] };
globalThis.window = { location: { origin: "http://gw.example", pathname: "/_portcullis/admin/users/u1", search: "?link=x" } };
const { toBuffer, toBase64url, explain, nextStep } = await import("../../static/webauthn.js");

test("base64url round-trips every length and byte value, without padding or + /", () => {
  for (let n = 0; n < 70; n++) {
    const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 97 + n * 13) & 255);
    const text = toBase64url(bytes.buffer);
    assert.doesNotMatch(text, /[+/=]/);
    assert.deepEqual(new Uint8Array(toBuffer(text)), bytes);
  }
  assert.equal(toBase64url(Uint8Array.from([0xfb, 0xff, 0xbf]).buffer), "-_-_");
  assert.deepEqual(new Uint8Array(toBuffer("-_-_")), Uint8Array.from([0xfb, 0xff, 0xbf]));
});

test("browser errors get messages a user can act on", () => {
  assert.match(explain({ name: "NotAllowedError" }), /cancelled or timed out/);
  // Where the key had to check its user, that is named as a likely reason.
  assert.match(explain({ name: "NotAllowedError", userVerification: "required" }), /cannot check a PIN or fingerprint/);
  assert.doesNotMatch(explain({ name: "NotAllowedError", userVerification: "preferred" }), /PIN/);
  assert.match(explain({ name: "InvalidStateError" }), /already registered/);
  assert.match(explain({ name: "SecurityError" }), /cannot use security keys/);
  assert.equal(explain({ serverMessage: "The key was not accepted." }), "The key was not accepted.");
  assert.match(explain(undefined), /try again/);
});

test("a refusal's way on is linked: the step-up it names, the device check back to this page, or signing in again", () => {
  assert.deepEqual(nextStep({ reauth: "/_portcullis/reauth?next=%2Fx&key=1" }), {
    href: "/_portcullis/reauth?next=%2Fx&key=1",
    text: "Confirm it's you",
  });
  assert.deepEqual(nextStep({ bind: "/_portcullis/bind" }), {
    href: "/_portcullis/bind?next=%2F_portcullis%2Fadmin%2Fusers%2Fu1%3Flink%3Dx",
    text: "Confirm this browser",
  });
  // Nothing but same-origin paths.
  assert.deepEqual(nextStep({ login: "/_portcullis/login?next=%2Fx&notice=key_suspended" }), {
    href: "/_portcullis/login?next=%2Fx&notice=key_suspended",
    text: "Sign in again",
  });
  assert.equal(nextStep({ login: "//evil.example/" }), null);
  assert.equal(nextStep({ reauth: "https://evil.example/" }), null);
  assert.equal(nextStep({ reauth: "//evil.example/" }), null);
  assert.equal(nextStep({ message: "no way on" }), null);
});
