"""The settlement digest the vault checks, mirrored in Python, and the hospital's signature.

The vault (``contracts/ClearingVault.vy``) accepts a settlement only with a secp256k1
signature by the hospital's registered settlement key over::

    digest = keccak256(abi_encode(SETTLE_TAG, chain_id, vault, job_id,
                                  receipt_hash, records, price_per_record))

signed as an EIP-191 personal message (``"\\x19Ethereum Signed Message:\\n32" ‖ digest``), with
``SETTLE_TAG = keccak256("rapha.ClearingVault.settle.v1")``. Binding the chain id and the vault
address stops a signature being replayed on another chain or vault; binding the job id stops
it being used for another job.
"""

from __future__ import annotations

from eth_abi.abi import encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from rapha.errors import UsageError

SETTLE_TAG = keccak(text="rapha.ClearingVault.settle.v1")

_UINT256_MAX = 2**256 - 1


def _bytes32(name: str, value: bytes) -> bytes:
    if len(value) != 32:
        raise UsageError(f"{name} must be 32 bytes, got {len(value)}")
    return value


def _uint(name: str, value: int) -> int:
    if not 0 <= value <= _UINT256_MAX:
        raise UsageError(f"{name} must be an unsigned 256-bit integer")
    return value


def job_id_of(payer: str, client_job_id: bytes) -> bytes:
    """The vault's job id: ``keccak256(abi_encode(payer, client_job_id))``."""
    return keccak(
        encode(
            ["address", "bytes32"],
            [to_checksum_address(payer), _bytes32("client_job_id", client_job_id)],
        )
    )


def settlement_digest(
    *,
    chain_id: int,
    vault: str,
    job_id: bytes,
    receipt_hash: bytes,
    records: int,
    price_per_record: int,
) -> bytes:
    """The 32-byte digest the hospital signs (before the EIP-191 prefix)."""
    return keccak(
        encode(
            ["bytes32", "uint256", "address", "bytes32", "bytes32", "uint256", "uint256"],
            [
                SETTLE_TAG,
                _uint("chain_id", chain_id),
                to_checksum_address(vault),
                _bytes32("job_id", job_id),
                _bytes32("receipt_hash", receipt_hash),
                _uint("records", records),
                _uint("price_per_record", price_per_record),
            ],
        )
    )


def sign_settlement(
    private_key: bytes,
    *,
    chain_id: int,
    vault: str,
    job_id: bytes,
    receipt_hash: bytes,
    records: int,
    price_per_record: int,
) -> bytes:
    """The hospital's 65-byte ``r ‖ s ‖ v`` signature that ``ClearingVault.settle`` accepts."""
    digest = settlement_digest(
        chain_id=chain_id,
        vault=vault,
        job_id=job_id,
        receipt_hash=receipt_hash,
        records=records,
        price_per_record=price_per_record,
    )
    signed = Account.sign_message(encode_defunct(primitive=digest), private_key=private_key)
    return bytes(signed.signature)


def settlement_signer(signature: bytes, digest: bytes) -> str:
    """The checksummed address whose key made ``signature`` over :func:`settlement_digest`.

    Raises:
        UsageError: the signature is not 65 bytes or does not recover to any key.
    """
    if len(signature) != 65:
        raise UsageError(f"a settlement signature is 65 bytes, got {len(signature)}")
    try:
        message = encode_defunct(primitive=_bytes32("digest", digest))
        return str(Account.recover_message(message, signature=signature))
    except Exception as exc:  # eth-keys raises several types for a malformed signature
        raise UsageError("the settlement signature does not recover to any key") from exc


def refund_delay(*, lease_seconds: int, retries: int, margin_seconds: int) -> int:
    """The vault's refund delay for a hub lease: ``lease * (retries + 1) + margin``.

    A deposit becomes refundable this long after it was made. It must outlast every lease
    the hub may grant the job (the first and each retry) plus time to mine the settlement,
    or a payer could take the budget back while a hospital is still computing.
    """
    if lease_seconds <= 0 or retries < 0 or margin_seconds <= 0:
        raise UsageError("lease and margin must be positive and retries not negative")
    return lease_seconds * (retries + 1) + margin_seconds
