"""DingTalk's callback crypto (fact sheet 8.2), against vectors computed independently here.

The reference side never touches ``plugins.dingtalk.crypto``: AES-256-CBC runs in the ``openssl``
command-line tool (``-nopad``: the 32-byte PKCS#7 padding is built by hand below), the signature is
the sheet's rule written out with ``hashlib``. One vector is DingTalk's own, published in
``open-dingtalk/DingTalk-Callback-Crypto`` (``DingCallbackCrypto3.py``'s ``__main__``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import subprocess

import pytest

from plugins.dingtalk.crypto import (
    BAD_AES_KEY,
    OWNER_KEY_MISMATCH,
    SIGNATURE_MISMATCH,
    CallbackCrypto,
    CallbackCryptoError,
    pkcs7_pad,
    pkcs7_unpad,
)

TOKEN = "sandboxToken2024"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 characters
SUITE_KEY = "suite4xxxxxxxxxxxxxxx"
PREFIX = bytes(range(16))  # the "random" 16 bytes, fixed so the ciphertext is a vector

# DingTalk's published vector (Token, EncodingAESKey, owner key = a corpId, and one callback).
PUBLISHED = {
    "token": "mryue",
    "aes_key": "Yue0EfdN5900c1ce5cf6A152c63DDe1808a60c5ecd7",
    "owner": "ding6ccabc44d2c8d38b",
    "signature": "03044561471240d4a14bb09372dfcfd4fd0e40cb",
    "timestamp": "1608001896814",
    "nonce": "WL4PK6yA",
    "encrypt": "0vJiX6vliEpwG3U45CtXqi+m8PXbQRARJ8p8BbDuD1EMTDf0jKpQ79QS93qEk7XHpP6u+oTTrd15NRPvNvmBKyDCYxxOK+"
               "HZeKju4yhELOFchzNukR+t8SB/qk4ROMu3",
}


def openssl(direction: str, data: bytes, aes_key: str) -> bytes:
    """AES-256-CBC with IV = key[:16] and no padding, by the openssl CLI."""
    binary = shutil.which("openssl")
    if binary is None:
        pytest.skip("openssl is not installed")
    key = base64.b64decode(aes_key + "=")
    flag = "-d" if direction == "decrypt" else "-e"
    done = subprocess.run(
        [binary, "enc", flag, "-aes-256-cbc", "-nopad", "-K", key.hex(), "-iv", key[:16].hex()],
        input=data, capture_output=True, check=True,
    )
    return done.stdout


def reference_plaintext(message: str, owner: str, prefix: bytes = PREFIX) -> bytes:
    body = message.encode("utf-8")
    plain = prefix + struct.pack(">I", len(body)) + body + owner.encode("utf-8")
    pad = 32 - len(plain) % 32
    return plain + bytes([pad]) * pad


def reference_encrypt(message: str, owner: str, aes_key: str = AES_KEY) -> str:
    return base64.b64encode(openssl("encrypt", reference_plaintext(message, owner), aes_key)).decode()


def reference_signature(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


def test_the_published_vector_verifies_and_decrypts() -> None:
    crypto = CallbackCrypto(PUBLISHED["token"], PUBLISHED["aes_key"], PUBLISHED["owner"])
    text = crypto.open(PUBLISHED["signature"], PUBLISHED["timestamp"], PUBLISHED["nonce"], PUBLISHED["encrypt"])
    assert json.loads(text) == {"EventType": "check_url"}
    # The reference side agrees on both halves of the vector.
    assert reference_signature(PUBLISHED["token"], PUBLISHED["timestamp"], PUBLISHED["nonce"],
                               PUBLISHED["encrypt"]) == PUBLISHED["signature"]
    plain = openssl("decrypt", base64.b64decode(PUBLISHED["encrypt"]), PUBLISHED["aes_key"])
    assert plain.endswith(bytes([plain[-1]]) * plain[-1]) and plain[-1] == 31  # block size 32, not 16


@pytest.mark.parametrize(
    "message",
    [
        '{"EventType":"check_url"}',
        # non-ASCII: the length is UTF-8 bytes (the Java lib), not characters (the Python 3 lib)
        '{"EventType":"suite_ticket","SuiteTicket":"票据-ticket","TimeStamp":1}',
        "x" * 11,  # 16 + 4 + 11 + 21 (owner) = 52: pads to 64
        "y" * 24,  # 16 + 4 + 24 + 20 = 64 with a 20-char owner below: a whole extra block of 32
    ],
)
def test_encrypt_matches_openssl_and_round_trips(message: str) -> None:
    owner = SUITE_KEY if len(message) != 24 else "o" * 20
    crypto = CallbackCrypto(TOKEN, AES_KEY, owner)
    produced = crypto.encrypt(message, random_prefix=PREFIX)
    assert produced == reference_encrypt(message, owner)
    assert crypto.decrypt(produced) == message
    timestamp, nonce = "1700000000000", "n0nce"
    assert crypto.sign(timestamp, nonce, produced) == reference_signature(TOKEN, timestamp, nonce, produced)
    assert crypto.open(reference_signature(TOKEN, timestamp, nonce, produced), timestamp, nonce, produced) == message


def test_a_reference_ciphertext_with_a_random_prefix_decrypts() -> None:
    plain = reference_plaintext("hello 钉钉", SUITE_KEY, prefix=b"R" * 16)
    encrypted = base64.b64encode(openssl("encrypt", plain, AES_KEY)).decode()
    assert CallbackCrypto(TOKEN, AES_KEY, SUITE_KEY).decrypt(encrypted) == "hello 钉钉"


def test_padding_is_pkcs7_with_block_32() -> None:
    assert pkcs7_pad(b"a" * 31)[-1:] == b"\x01"
    assert pkcs7_pad(b"a" * 32) == b"a" * 32 + b"\x20" * 32
    assert pkcs7_unpad(b"a" * 5 + b"\x03" * 3) == b"a" * 5
    for broken in (b"a" * 31 + b"\x00", b"a" * 31 + b"\x21", b"a" * 30 + b"\x01\x02"):
        with pytest.raises(CallbackCryptoError):
            pkcs7_unpad(broken)


def test_a_wrong_signature_is_900005() -> None:
    crypto = CallbackCrypto(TOKEN, AES_KEY, SUITE_KEY)
    encrypted = reference_encrypt("{}", SUITE_KEY)
    other_token = reference_signature("another", "1", "n", encrypted)
    for signature in (other_token, "0" * 40, ""):
        with pytest.raises(CallbackCryptoError) as caught:
            crypto.open(signature, "1", "n", encrypted)
        assert caught.value.code == SIGNATURE_MISMATCH
    # The signature covers the timestamp and the nonce too.
    good = reference_signature(TOKEN, "1", "n", encrypted)
    with pytest.raises(CallbackCryptoError):
        crypto.open(good, "2", "n", encrypted)


def test_a_wrong_owner_key_is_900010() -> None:
    encrypted = reference_encrypt('{"EventType":"check_url"}', "suiteSomeoneElse")
    crypto = CallbackCrypto(TOKEN, AES_KEY, SUITE_KEY)
    with pytest.raises(CallbackCryptoError) as caught:
        crypto.decrypt(encrypted)
    assert caught.value.code == OWNER_KEY_MISMATCH
    published = CallbackCrypto(PUBLISHED["token"], PUBLISHED["aes_key"], "suiteNotTheCorp")
    with pytest.raises(CallbackCryptoError) as caught:
        published.open(PUBLISHED["signature"], PUBLISHED["timestamp"], PUBLISHED["nonce"], PUBLISHED["encrypt"])
    assert caught.value.code == OWNER_KEY_MISMATCH


def test_tampered_ciphertext_is_rejected() -> None:
    crypto = CallbackCrypto(TOKEN, AES_KEY, SUITE_KEY)
    encrypted = reference_encrypt('{"EventType":"suite_ticket","SuiteTicket":"T1"}', SUITE_KEY)
    raw = bytearray(base64.b64decode(encrypted))
    raw[-1] ^= 0x01  # the last block: its padding no longer checks out
    tampered = base64.b64encode(bytes(raw)).decode()
    signature = reference_signature(TOKEN, "1", "n", encrypted)
    with pytest.raises(CallbackCryptoError) as caught:
        crypto.open(signature, "1", "n", tampered)  # with the original signature
    assert caught.value.code == SIGNATURE_MISMATCH
    with pytest.raises(CallbackCryptoError):
        crypto.decrypt(tampered)  # even past the signature, it does not decrypt
    for garbage in ("not base64!", base64.b64encode(b"short").decode(), ""):
        with pytest.raises(CallbackCryptoError):
            crypto.decrypt(garbage)


def test_a_bad_aes_key_is_900004() -> None:
    for key in ("short", AES_KEY + "x", AES_KEY[:-1] + "+"):
        with pytest.raises(CallbackCryptoError) as caught:
            CallbackCrypto(TOKEN, key, SUITE_KEY)
        assert caught.value.code == BAD_AES_KEY


def test_the_success_reply_is_what_dingtalk_checks() -> None:
    crypto = CallbackCrypto(TOKEN, AES_KEY, SUITE_KEY)
    reply = crypto.encrypted_map("success", timestamp="1700000000123")
    assert set(reply) == {"msg_signature", "timeStamp", "nonce", "encrypt"}
    assert reply["timeStamp"] == "1700000000123" and len(reply["nonce"]) == 16
    assert reply["msg_signature"] == reference_signature(TOKEN, reply["timeStamp"], reply["nonce"], reply["encrypt"])
    plain = openssl("decrypt", base64.b64decode(reply["encrypt"]), AES_KEY)
    plain = plain[: -plain[-1]]
    (length,) = struct.unpack(">I", plain[16:20])
    assert plain[20 : 20 + length] == b"success" and plain[20 + length :] == SUITE_KEY.encode()
    # Each reply has its own random prefix and nonce.
    assert crypto.encrypted_map("success")["encrypt"] != reply["encrypt"]
