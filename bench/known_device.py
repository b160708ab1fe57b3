#!/usr/bin/env python3
"""The real user of the attack benchmark, signing in as a browser with "Remember this browser".

  known_device.py enrol GW EMAIL PASSWORD TOTP_SECRET STATE
      password + TOTP with "remember" ticked, then binds the session to a fresh P-256 key (the
      WebCrypto fallback), which makes this browser a known, remembered device; saves the key and
      the cookies to STATE (JSON).
  known_device.py sign-in GW EMAIL PASSWORD STATE [SOURCE_IP]
      from that device: password, then the device proof instead of the second factor; checks
      that a console page loads with the new session. Prints one JSON line: ok, the status of
      each step and the seconds it took.
"""
import base64
import hmac
import http.client
import json
import re
import struct
import sys
import time
import urllib.parse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


class Browser:
    def __init__(self, gw, cookies=None, source=None):
        self.gw, self.base = gw, f"http://{gw}"
        self.cookies = dict(cookies or {})
        host, port = gw.rsplit(":", 1)
        self.conn = lambda: http.client.HTTPConnection(host, int(port), timeout=30,
                                                       source_address=(source, 0) if source else None)

    def request(self, method, path, form=None, body=None, csrf=None):
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Origin"] = self.base
        if body is not None:
            data = json.dumps(body)
            headers.update({"Content-Type": "application/json", "Accept": "application/json",
                            "Origin": self.base, "X-CSRF-Token": csrf})
        c = self.conn()
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        text = r.read().decode()
        for h in r.headers.get_all("Set-Cookie") or []:
            name, value = h.split(";", 1)[0].split("=", 1)
            if value:
                self.cookies[name] = value
            else:
                self.cookies.pop(name, None)
        c.close()
        return r.status, r.headers.get("Location"), text

    def csrf(self, path):
        status, _, page = self.request("GET", path)
        m = re.search(r'name="csrf" value="([^"]+)"', page) or re.search(r'data-csrf="([^"]+)"', page)
        if not m:
            raise SystemExit(f"no CSRF token on {path} (status {status})")
        return m.group(1)

    def password(self, email, password):
        t = self.csrf("/_portcullis/login")
        return self.request("POST", "/_portcullis/login",
                            form={"username": email, "password": password, "csrf": t, "next": ""})


def totp(secret, offset=0):
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30 + offset), "sha1").digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


def proof(key, challenge):
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return jwt.encode({"jti": challenge}, key, algorithm="ES256", headers={"typ": "dbsc+jwt", "jwk": jwk})


def enrol(gw, email, password, secret, state):
    b = Browser(gw)
    status, loc, _ = b.password(email, password)
    assert status == 303 and loc.endswith("/_portcullis/mfa"), (status, loc)
    t = b.csrf("/_portcullis/mfa")
    status, loc, _ = b.request("POST", "/_portcullis/mfa", form={"code": totp(secret), "csrf": t, "remember": "on"})
    assert status == 303, ("mfa", status, loc)
    t = b.csrf("/_portcullis/bind")
    key = ec.generate_private_key(ec.SECP256R1())
    status, _, text = b.request("POST", "/_portcullis/bind/challenge", body={}, csrf=t)
    challenge = json.loads(text)["challenge"]
    status, _, text = b.request("POST", "/_portcullis/bind/register", body={"proof": proof(key, challenge)}, csrf=t)
    assert status == 200, ("bind", status, text)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    device = {k: v for k, v in b.cookies.items() if k.endswith("device") or k.endswith("csrf")}
    browse = "; ".join(f"{k}={v}" for k, v in b.cookies.items() if k.endswith(("-session", "-bound")))
    json.dump({"key": pem, "cookies": device, "browse": browse}, open(state, "w"))


def sign_in(gw, email, password, state, source=None):
    saved = json.load(open(state))
    key = serialization.load_pem_private_key(saved["key"].encode(), None)
    b = Browser(gw, saved["cookies"], source)
    started = time.monotonic()
    steps = {}
    status, loc, _ = b.password(email, password)
    steps["password"] = status
    ok = False
    if status == 303 and loc.endswith("/_portcullis/remembered"):
        t = b.csrf("/_portcullis/remembered")
        status, _, text = b.request("POST", "/_portcullis/remembered/challenge", body={}, csrf=t)
        steps["challenge"] = status
        if status == 200:
            challenge = json.loads(text)["challenge"]
            status, _, text = b.request("POST", "/_portcullis/remembered/finish",
                                        body={"proof": proof(key, challenge)}, csrf=t)
            steps["device_proof"] = status
            if status == 200:
                status, _, _ = b.request("GET", "/campaigns")
                steps["console"] = status
                ok = status == 200
    elif status == 303:
        steps["went_to"] = loc
    print(json.dumps({"ok": ok, "steps": steps, "seconds": round(time.monotonic() - started, 3)}))
    return ok


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "enrol":
        enrol(*args)
    elif cmd == "sign-in":
        sys.exit(0 if sign_in(*args) else 1)
    else:
        raise SystemExit(__doc__)
