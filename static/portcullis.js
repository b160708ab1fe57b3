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
