// Progressive enhancement only: every gateway page works without script.
// Selecting the manual TOTP key with one click makes copying it less error-prone.
const secret = document.getElementById("totp-secret");
if (secret) {
  secret.addEventListener("click", () => {
    const range = document.createRange();
    range.selectNodeContents(secret);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  });
}

// A form held for a step-up goes on by itself once the step-up is done (its page says what it
// sends; without script, its button does it).
const held = document.querySelector("form[data-autosubmit]");
if (held) {
  const send = held.querySelector("button[type=submit]:not([name])");
  const status = document.querySelector("[data-held-status]");
  if (status) status.textContent = "Sending…";
  held.requestSubmit(send);
  // Still here a moment later: the console answered with a download, which the browser saved.
  setTimeout(() => {
    if (status) status.textContent = "Sent. If this page stays, the console answered with a file, which your browser has saved (look in its downloads).";
    held.querySelectorAll("button").forEach((b) => (b.disabled = true));
  }, 4000);
}

// After a step-up: on to the page it was for, the confirmation left out of the history. A
// download leaves this page in place, saying it is done.
const onward = document.querySelector("[data-continue]");
if (onward) {
  const next = onward.dataset.continue || "/";
  if (next.startsWith("/") && !next.startsWith("//")) location.replace(next);
}
