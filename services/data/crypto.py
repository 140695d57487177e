"""Encryption at rest for sensitive datasets: per-org data keys wrapped under a platform key, and
a chunked AES-256-GCM object format that streams and serves plaintext byte ranges."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"WBENC1"
HEADER_SIZE = 18  # MAGIC + chunk size (4 bytes BE) + nonce prefix (8 random bytes)
TAG_SIZE = 16
DEFAULT_CHUNK_SIZE = 1 << 20
# A header is read from storage before it is authenticated; the cap keeps a forged one from
# making a reader buffer gigabytes.
MAX_CHUNK_SIZE = 1 << 26
KEY_SIZE = 32
_WRAP_PREFIX = b"WK1"
_NONCE_SIZE = 12
_PREFIX_SIZE = 8


class DecryptionError(Exception):
    """The data is not ours, was changed or truncated, or the key is wrong."""


def derive_kek(secret: str) -> bytes:
    if not secret:
        raise ValueError("the platform secret is empty")
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=b"xai-workbench", info=b"wb-data-kek-v1"
    )
    return hkdf.derive(secret.encode())


def new_data_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _aead(key: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise ValueError(f"keys are {KEY_SIZE} bytes, got {len(key)}")
    return AESGCM(key)


def wrap_key(kek: bytes, dek: bytes, org_id: str) -> bytes:
    if len(dek) != KEY_SIZE:
        raise ValueError(f"data keys are {KEY_SIZE} bytes, got {len(dek)}")
    nonce = os.urandom(_NONCE_SIZE)
    # The org id as associated data binds the wrapped key to its row's org.
    return _WRAP_PREFIX + nonce + _aead(kek).encrypt(nonce, dek, org_id.encode())


def unwrap_key(kek: bytes, wrapped: bytes, org_id: str) -> bytes:
    head = len(_WRAP_PREFIX) + _NONCE_SIZE
    if not wrapped.startswith(_WRAP_PREFIX) or len(wrapped) != head + KEY_SIZE + TAG_SIZE:
        raise DecryptionError("not a wrapped data key")
    try:
        return _aead(kek).decrypt(
            wrapped[len(_WRAP_PREFIX) : head], wrapped[head:], org_id.encode()
        )
    except InvalidTag:
        raise DecryptionError(
            "wrapped data key failed to unwrap: it belongs to another organization, "
            "or the platform secret changed"
        ) from None


def _check_chunk_size(chunk_size: int) -> None:
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_SIZE}, got {chunk_size}")


def _chunk_count(plain_size: int, chunk_size: int) -> int:
    # An empty plaintext still gets one (empty) sealed chunk carrying the final flag.
    return max(1, -(-plain_size // chunk_size))


def ciphertext_size(plain_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    _check_chunk_size(chunk_size)
    if plain_size < 0:
        raise ValueError("negative size")
    return HEADER_SIZE + plain_size + TAG_SIZE * _chunk_count(plain_size, chunk_size)


def plaintext_size(cipher_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    _check_chunk_size(chunk_size)
    body = cipher_size - HEADER_SIZE
    if body < TAG_SIZE:
        raise ValueError(f"{cipher_size} bytes is too short for an encrypted object")
    full, rest = divmod(body, chunk_size + TAG_SIZE)
    if rest == 0:
        return full * chunk_size
    # A short last chunk holds at least one byte, unless it is the only chunk.
    if rest < TAG_SIZE or (rest == TAG_SIZE and full > 0):
        raise ValueError(f"{cipher_size} bytes is not a possible size for chunk size {chunk_size}")
    return full * chunk_size + rest - TAG_SIZE


def cipher_range_for(
    plain_start: int, plain_end_inclusive: int, plain_size: int, chunk_size: int
) -> tuple[int, int, int, int]:
    """(cipher_start, cipher_end_inclusive, first_chunk_index, skip_bytes_in_first_chunk)."""
    _check_chunk_size(chunk_size)
    if not 0 <= plain_start <= plain_end_inclusive < plain_size:
        raise ValueError(f"range {plain_start}-{plain_end_inclusive} outside 0..{plain_size - 1}")
    sealed = chunk_size + TAG_SIZE
    first, last = plain_start // chunk_size, plain_end_inclusive // chunk_size
    last_plain = min(chunk_size, plain_size - last * chunk_size)
    return (
        HEADER_SIZE + first * sealed,
        HEADER_SIZE + last * sealed + last_plain + TAG_SIZE - 1,
        first,
        plain_start - first * chunk_size,
    )


def parse_header(header: bytes) -> tuple[int, bytes]:
    if len(header) != HEADER_SIZE or not header.startswith(MAGIC):
        raise DecryptionError("not an encrypted object (bad header)")
    chunk_size = int.from_bytes(header[6:10], "big")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise DecryptionError(f"encrypted object header has an invalid chunk size {chunk_size}")
    return chunk_size, header[10:]


class _Chunker:
    """What both directions share: the header, the chunk counter and the per-chunk AEAD inputs."""

    def __init__(self, dek: bytes) -> None:
        self._aead = _aead(dek)
        self._header = b""
        self._prefix = b""
        self._chunk_size = 0
        self._index = 0
        self._buf = bytearray()
        self._done = False

    def _set_header(self, header: bytes) -> None:
        self._chunk_size, self._prefix = parse_header(header)
        self._header = header

    def _inputs(self, final: bool) -> tuple[bytes, bytes]:
        index = self._index.to_bytes(4, "big")
        # Index and final flag in the associated data catch reordered, dropped or added chunks.
        return self._prefix + index, self._header + index + (b"\x01" if final else b"\x00")

    def _check_open(self) -> None:
        if self._done:
            raise ValueError("finalize() was already called")


class Encryptor(_Chunker):
    """Feed plaintext pieces of any size; get sealed bytes out (header first). Holds at most one
    chunk."""

    def __init__(self, dek: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__(dek)
        _check_chunk_size(chunk_size)
        self._set_header(MAGIC + chunk_size.to_bytes(4, "big") + os.urandom(_PREFIX_SIZE))
        self._started = False
        self.plain_size = 0

    def _seal(self, plain: memoryview | bytearray, final: bool) -> bytes:
        # Past 2**32 chunks the 4-byte index would wrap; to_bytes raises OverflowError first.
        nonce, aad = self._inputs(final)
        self._index += 1
        return self._aead.encrypt(nonce, plain, aad)

    def _start(self) -> list[bytes]:
        started, self._started = self._started, True
        return [] if started else [self._header]

    def update(self, data: bytes) -> bytes:
        self._check_open()
        self.plain_size += len(data)
        self._buf += data
        out = self._start()
        pos, size = 0, self._chunk_size
        with memoryview(self._buf) as view:
            # A full chunk waits until more data shows it is not the last (final flag unknown).
            while len(view) - pos > size:
                out.append(self._seal(view[pos : pos + size], final=False))
                pos += size
        del self._buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        self._check_open()
        out = self._start()
        out.append(self._seal(self._buf, final=True))
        self._done, self._buf = True, bytearray()
        return b"".join(out)


async def encrypt_stream(
    chunks: AsyncIterable[bytes], dek: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AsyncIterator[bytes]:
    enc = Encryptor(dek, chunk_size=chunk_size)
    async for piece in chunks:
        if out := enc.update(piece):
            yield out
    yield enc.finalize()


class Decryptor(_Chunker):
    """Feed ciphertext pieces of any size (starting at the header, or at chunk `first_index` when
    created for a range); get plaintext. With `total_chunks`, chunk total_chunks-1 is the final
    one; without it, the last chunk before finalize() must be."""

    def __init__(
        self,
        dek: bytes,
        *,
        header: bytes | None = None,
        first_index: int = 0,
        total_chunks: int | None = None,
    ) -> None:
        super().__init__(dek)
        if header is not None:
            self._set_header(header)
        elif first_index:
            raise ValueError("starting past chunk 0 needs the object's header")
        if first_index < 0 or (total_chunks is not None and not first_index < total_chunks):
            raise ValueError(f"bad chunk range: first {first_index}, total {total_chunks}")
        self._index = first_index
        self._total = total_chunks

    def _open(self, sealed: memoryview | bytearray, final: bool) -> bytes:
        nonce, aad = self._inputs(final)
        try:
            plain = self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise DecryptionError(
                f"chunk {self._index} failed authentication: the object was changed or "
                "truncated, or the key is wrong"
            ) from None
        self._index += 1
        return plain

    def update(self, data: bytes) -> bytes:
        self._check_open()
        self._buf += data
        if not self._header:
            if len(self._buf) < HEADER_SIZE:
                return b""
            self._set_header(bytes(self._buf[:HEADER_SIZE]))
            del self._buf[:HEADER_SIZE]
        out: list[bytes] = []
        pos, sealed = 0, self._chunk_size + TAG_SIZE
        with memoryview(self._buf) as view:
            while True:
                left = len(view) - pos
                if self._total is None:
                    # Only bytes after a full chunk prove it is not the final one.
                    if left <= sealed:
                        break
                elif self._index == self._total - 1:
                    if left > sealed:
                        raise DecryptionError("data after the final chunk")
                    break  # its size is unknown here; finalize() opens it
                elif left < sealed:
                    break
                out.append(self._open(view[pos : pos + sealed], final=False))
                pos += sealed
        del self._buf[:pos]
        return b"".join(out)

    def finalize(self) -> bytes:
        self._check_open()
        self._done, left = True, len(self._buf)
        if not self._header:
            raise DecryptionError("the object ends inside its header")
        if left == 0 and self._total is not None:
            return b""  # a range that stops at a chunk boundary
        if left < TAG_SIZE or (self._total is not None and self._index < self._total - 1):
            raise DecryptionError(f"the object was truncated in chunk {self._index}")
        return self._open(self._buf, final=True)


async def _decrypted(dec: Decryptor, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    stream = aiter(chunks)
    try:
        async for piece in stream:
            if out := dec.update(piece):
                yield out
    finally:
        # Frees a store stream left early (e.g. on a DecryptionError) and its connection.
        if (aclose := getattr(stream, "aclose", None)) is not None:
            await aclose()
    if out := dec.finalize():
        yield out


async def decrypt_stream(chunks: AsyncIterable[bytes], dek: bytes) -> AsyncIterator[bytes]:
    async for out in _decrypted(Decryptor(dek), chunks):
        yield out


async def decrypt_range(
    read: Callable[[int, int | None], AsyncIterator[bytes]],
    dek: bytes,
    cipher_size: int,
    start: int,
    end: int,
) -> AsyncIterator[bytes]:
    """Plaintext bytes start..end (inclusive) of an encrypted object of `cipher_size` bytes.
    `read(s, e)` streams the object's bytes s..e inclusive; it is called once for the header
    and once for the covering chunks. The final chunk is authenticated with its final flag when
    the range reaches it. ValueError if the range is outside the plaintext."""
    if cipher_size < HEADER_SIZE + TAG_SIZE:
        raise DecryptionError(f"{cipher_size} bytes is too short for an encrypted object")
    stream = read(0, HEADER_SIZE - 1)
    header = b"".join([piece async for piece in stream])[:HEADER_SIZE]
    chunk_size, _ = parse_header(header)
    try:
        plain_size = plaintext_size(cipher_size, chunk_size)
    except ValueError as e:
        raise DecryptionError(f"the object was truncated or extended: {e}") from None
    cipher_start, cipher_end, first, skip = cipher_range_for(start, end, plain_size, chunk_size)
    total = _chunk_count(plain_size, chunk_size)
    dec = Decryptor(dek, header=header, first_index=first, total_chunks=total)
    want = end - start + 1
    async for out in _decrypted(dec, read(cipher_start, cipher_end)):
        if skip:
            out, skip = out[skip:], max(0, skip - len(out))
        if out and want:
            yield out[:want]
            want -= min(want, len(out))
    if want:
        raise DecryptionError("the object is shorter than its size says")
