"""Tests of the at-rest encryption of sensitive datasets (services/data/crypto.py)."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable, Iterable

import pytest

from services.data.crypto import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    DecryptionError,
    Decryptor,
    Encryptor,
    cipher_range_for,
    ciphertext_size,
    decrypt_range,
    decrypt_stream,
    derive_kek,
    encrypt_stream,
    new_data_key,
    parse_header,
    plaintext_size,
    unwrap_key,
    wrap_key,
)

C = 1000
DEK = new_data_key()


def pieces(data: bytes, rng: random.Random, most: int = 3 * C) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.randint(0, most)
        out.append(data[pos : pos + n])
        pos += n
    return out


def encrypt(data: bytes, chunk_size: int = C, dek: bytes = DEK, seed: int = 0) -> bytes:
    enc = Encryptor(dek, chunk_size=chunk_size)
    out = [enc.update(p) for p in pieces(data, random.Random(seed))]
    out.append(enc.finalize())
    assert enc.plain_size == len(data)
    return b"".join(out)


def decrypt(blob: bytes, dek: bytes = DEK, seed: int = 1) -> bytes:
    dec = Decryptor(dek)
    out = [dec.update(p) for p in pieces(blob, random.Random(seed))]
    out.append(dec.finalize())
    return b"".join(out)


async def aiter_of(items: Iterable[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([piece async for piece in it])


def sealed_chunks(blob: bytes, chunk_size: int = C) -> list[bytes]:
    body = blob[HEADER_SIZE:]
    step = chunk_size + TAG_SIZE
    return [body[i : i + step] for i in range(0, len(body), step)]


SIZES = [0, 1, C - 1, C, C + 1, 5 * C + C // 2]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip(size: int, seed: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data, seed=seed)
    assert blob.startswith(MAGIC)
    assert len(blob) == ciphertext_size(size, C)
    assert decrypt(blob, seed=seed + 10) == data
    # Byte-at-a-time feeding works too.
    dec = Decryptor(DEK)
    assert b"".join(dec.update(blob[i : i + 1]) for i in range(len(blob))) + dec.finalize() == data


@pytest.mark.parametrize("size", SIZES)
async def test_async_round_trip(size: int) -> None:
    data = os.urandom(size)
    rng = random.Random(size)
    blob = await collect(encrypt_stream(aiter_of(pieces(data, rng)), DEK, chunk_size=C))
    assert len(blob) == ciphertext_size(size, C)
    assert await collect(decrypt_stream(aiter_of(pieces(blob, rng)), DEK)) == data


async def test_default_chunk_size_streams_in_whole_chunks() -> None:
    data = os.urandom(3 * DEFAULT_CHUNK_SIZE + 12345)
    small = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    out = [piece async for piece in encrypt_stream(aiter_of(small), DEK)]
    # Header, then one yield per sealed chunk: input is batched, not echoed per piece.
    assert [len(p) for p in out] == [HEADER_SIZE] + [DEFAULT_CHUNK_SIZE + TAG_SIZE] * 3 + [
        12345 + TAG_SIZE
    ]
    blob = b"".join(out)
    assert parse_header(blob[:HEADER_SIZE])[0] == DEFAULT_CHUNK_SIZE
    back = [
        p
        async for p in decrypt_stream(
            aiter_of([blob[i : i + 4096] for i in range(0, len(blob), 4096)]), DEK
        )
    ]
    assert b"".join(back) == data
    assert len(back) == 4


def test_encryptor_holds_at_most_one_chunk() -> None:
    enc = Encryptor(DEK, chunk_size=C)
    assert len(enc.update(b"x" * C)) == HEADER_SIZE  # a full chunk may still be the last one
    assert len(enc.update(b"x")) == C + TAG_SIZE
    assert len(enc.update(b"x" * (3 * C))) == 3 * (C + TAG_SIZE)
    assert len(enc.finalize()) == 1 + TAG_SIZE
    with pytest.raises(ValueError):
        enc.update(b"more")


@pytest.mark.parametrize("chunk", [1, 2, 7, 16, 17, 100])
def test_size_arithmetic(chunk: int) -> None:
    sizes = {}
    for size in range(0, 6 * chunk + 3):
        blob = encrypt(os.urandom(size), chunk_size=chunk, seed=size)
        assert len(blob) == ciphertext_size(size, chunk)
        assert plaintext_size(len(blob), chunk) == size
        sizes[len(blob)] = size
    # Every other cipher size up to there is impossible.
    for cipher in range(0, max(sizes) + 1):
        if cipher in sizes:
            continue
        with pytest.raises(ValueError):
            plaintext_size(cipher, chunk)


def test_size_arithmetic_large() -> None:
    for size in [0, 1, DEFAULT_CHUNK_SIZE, 5 * DEFAULT_CHUNK_SIZE + 7, 20 << 30]:
        assert plaintext_size(ciphertext_size(size)) == size
    assert ciphertext_size(2 * DEFAULT_CHUNK_SIZE) == HEADER_SIZE + 2 * DEFAULT_CHUNK_SIZE + 32
    with pytest.raises(ValueError):
        ciphertext_size(-1)
    with pytest.raises(ValueError):
        ciphertext_size(10, 0)


def test_cipher_range_for_covers_exactly() -> None:
    chunk, size = 7, 40
    blob = encrypt(bytes(range(size)), chunk_size=chunk)
    assert cipher_range_for(0, size - 1, size, chunk) == (HEADER_SIZE, len(blob) - 1, 0, 0)
    assert cipher_range_for(8, 9, size, chunk) == (HEADER_SIZE + 23, HEADER_SIZE + 45, 1, 1)
    for start in range(size):
        for end in range(start, size):
            cs, ce, first, skip = cipher_range_for(start, end, size, chunk)
            dec = Decryptor(
                DEK, header=blob[:HEADER_SIZE], first_index=first, total_chunks=-(-size // chunk)
            )
            plain = dec.update(blob[cs : ce + 1]) + dec.finalize()
            assert plain[skip : skip + end - start + 1] == bytes(range(start, end + 1))
            assert len(plain) - skip - (end - start + 1) < chunk  # no whole extra chunk
    for bad in [(-1, 3), (5, 4), (0, size)]:
        with pytest.raises(ValueError):
            cipher_range_for(*bad, size, chunk)


def store(
    blob: bytes, calls: list[tuple[int, int | None]]
) -> Callable[[int, int | None], AsyncIterator[bytes]]:
    async def read(start: int, end: int | None) -> AsyncIterator[bytes]:
        calls.append((start, end))
        data = blob[start : None if end is None else end + 1]
        for i in range(0, len(data), 5):  # small pieces, to cross chunk boundaries
            yield data[i : i + 5]

    return read


async def test_decrypt_range_every_pair() -> None:
    plain = os.urandom(40)
    blob = encrypt(plain, chunk_size=7)
    for start in range(40):
        for end in range(start, 40):
            calls: list[tuple[int, int | None]] = []
            got = await collect(decrypt_range(store(blob, calls), DEK, len(blob), start, end))
            assert got == plain[start : end + 1], (start, end)
            assert len(calls) == 2
    with pytest.raises(ValueError):
        await collect(decrypt_range(store(blob, []), DEK, len(blob), 0, 40))


async def test_decrypt_range_authenticates_final_chunk() -> None:
    plain = os.urandom(40)
    blob = bytearray(encrypt(plain, chunk_size=7))
    blob[-1] ^= 1
    with pytest.raises(DecryptionError, match="chunk 5 failed authentication"):
        await collect(decrypt_range(store(bytes(blob), []), DEK, len(blob), 36, 39))
    # A range not reaching the damaged chunk still reads.
    assert (
        await collect(decrypt_range(store(bytes(blob), []), DEK, len(blob), 3, 20)) == plain[3:21]
    )
    # Dropping the final chunk while claiming the full size: the store comes up short.
    short = bytes(blob[: -(5 + TAG_SIZE)])
    with pytest.raises(DecryptionError):
        await collect(decrypt_range(store(short, []), DEK, len(blob), 30, 39))
    # A size that no encrypted object can have.
    with pytest.raises(DecryptionError):
        await collect(decrypt_range(store(bytes(blob), []), DEK, len(blob) - 20, 0, 3))


def tampered(blob: bytes) -> dict[str, bytes]:
    chunks = sealed_chunks(blob)
    head = blob[:HEADER_SIZE]
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + C + TAG_SIZE + 10] ^= 0x40
    tag = bytearray(blob)
    tag[HEADER_SIZE + C + 3] ^= 1
    header = bytearray(blob)
    header[12] ^= 1  # nonce prefix
    other = encrypt(os.urandom(len(blob)), seed=9)
    return {
        "flip": bytes(flipped),
        "flip tag": bytes(tag),
        "flip header": bytes(header),
        "swap": head + chunks[1] + chunks[0] + b"".join(chunks[2:]),
        "drop last": head + b"".join(chunks[:-1]),
        "drop middle": head + chunks[0] + b"".join(chunks[2:]),
        "cut mid-chunk": blob[:-5],
        "cut in header": blob[:10],
        "header only": head,
        "append copy": blob + chunks[-1],
        "append bytes": blob + b"\x00" * 20,
        "other header": other[:HEADER_SIZE] + blob[HEADER_SIZE:],
        "other's chunk": head + chunks[0] + sealed_chunks(other)[1] + b"".join(chunks[2:]),
    }


@pytest.mark.parametrize("size", [3 * C, 3 * C + 17])
def test_tamper_detected(size: int) -> None:
    blob = encrypt(os.urandom(size))
    for name, bad in tampered(blob).items():
        with pytest.raises(DecryptionError):
            decrypt(bad)
            pytest.fail(name)


def test_truncation_at_boundary_names_the_chunk() -> None:
    blob = encrypt(os.urandom(3 * C))
    with pytest.raises(DecryptionError, match="chunk 1 failed authentication"):
        decrypt(blob[: HEADER_SIZE + 2 * (C + TAG_SIZE)])


def test_wrong_key_and_foreign_data() -> None:
    blob = encrypt(b"secret rows" * 50)
    with pytest.raises(DecryptionError, match="chunk 0 failed authentication"):
        decrypt(blob, dek=new_data_key())
    with pytest.raises(DecryptionError, match="not an encrypted object"):
        decrypt(b"PAR1" + b"\x00" * 100)
    with pytest.raises(DecryptionError):
        parse_header(MAGIC + b"\x00\x00\x00\x00" + b"\x00" * 8)  # chunk size 0
    with pytest.raises(DecryptionError):
        parse_header(blob[: HEADER_SIZE - 1])
    assert parse_header(blob[:HEADER_SIZE])[0] == C


def test_range_decryptor_rejects_data_after_final_chunk() -> None:
    blob = encrypt(os.urandom(20), chunk_size=7)
    dec = Decryptor(DEK, header=blob[:HEADER_SIZE], first_index=2, total_chunks=3)
    with pytest.raises(DecryptionError, match="after the final chunk"):
        dec.update(blob[HEADER_SIZE + 2 * 23 :] + b"extra" * 10)
    with pytest.raises(ValueError):
        Decryptor(DEK, first_index=1)


def test_wrap_unwrap() -> None:
    kek = derive_kek("platform-secret")
    assert kek == derive_kek("platform-secret") and len(kek) == 32
    dek = new_data_key()
    wrapped = wrap_key(kek, dek, "org-a")
    assert wrapped.startswith(b"WK1") and len(wrapped) == 3 + 12 + 32 + 16
    assert unwrap_key(kek, wrapped, "org-a") == dek
    assert wrap_key(kek, dek, "org-a") != wrapped  # fresh nonce each time
    with pytest.raises(DecryptionError, match="another organization"):
        unwrap_key(kek, wrapped, "org-b")
    with pytest.raises(DecryptionError):
        unwrap_key(derive_kek("other-secret"), wrapped, "org-a")
    with pytest.raises(DecryptionError):
        unwrap_key(kek, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), "org-a")
    with pytest.raises(DecryptionError):
        unwrap_key(kek, b"XX1" + wrapped[3:], "org-a")
    with pytest.raises(ValueError):
        derive_kek("")


def test_ciphertext_hides_repetition() -> None:
    unit = b"0123456789abcdef"
    plain = unit * 1000
    blob = encrypt(plain)
    windows = {(unit * 2)[i : i + 16] for i in range(16)}
    assert not any(w in blob for w in windows)
    chunks = sealed_chunks(blob)
    assert len(set(chunks)) == len(chunks)  # equal plaintext chunks seal differently
    assert encrypt(plain) != blob  # and so do equal objects
