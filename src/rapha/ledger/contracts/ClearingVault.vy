# pragma version 0.4.3
"""
@title ClearingVault
@notice Escrow and settlement for Rapha jobs (issue 5, DESIGN.md "Chain").

        A payer deposits a job's budget in an ERC-20 (USDC) and commits the highest price per
        record it accepts. The operator (the hub) settles a job only with the hospital's
        secp256k1 signature over the figures, so neither the operator nor a thief holding
        its key can invent records or redirect payment. HOSPITAL_SHARE_BPS of the amount due
        is credited to the hospital's payout address, the rest (rounding included) to the
        treasury, and the unused budget to the payer. Every credit is pulled with
        withdraw(), so a recipient that cannot receive blocks nobody else.

        Settlement digest (mirrored by rapha.ledger.settlement_digest):
            digest = keccak256(abi_encode(SETTLE_TAG, chain.id, self, job_id,
                                          receipt_hash, records, price_per_record))
        and the hospital signs it as an EIP-191 personal message:
            keccak256(0x19 ++ "Ethereum Signed Message:" ++ LF ++ "32" ++ digest)

        Refund deadline: every deposit may be refunded once block.timestamp >= deposit time +
        refund_delay (set at construction). Choose refund_delay longer than the hub's lease x
        (retries + 1) plus a margin for settlement to be mined, so that a job still running
        under its last lease can never be refunded under it.
"""

from ethereum.ercs import IERC20

# The split: the hospital's share of the amount due, in basis points. Read only in _split().
HOSPITAL_SHARE_BPS: public(constant(uint256)) = 7000
BPS: constant(uint256) = 10000

SETTLE_TAG: public(constant(bytes32)) = keccak256("rapha.ClearingVault.settle.v1")
# secp256k1 n / 2: signatures with a higher s are malleable copies (EIP-2).
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

OPEN: constant(uint8) = 1
SETTLED: constant(uint8) = 2
FAILED: constant(uint8) = 3
REFUNDED: constant(uint8) = 4

# Amounts and prices fit 96 bits (7.9e22 USDC) and record counts 64 bits, so a job packs
# into five slots and settle writes three fresh ones. Layout (bit offsets, low first):
#   head:    payer [0, 160) | status [160, 168) | deadline [168, 232)
#   terms:   budget [0, 96) | max_price_per_record [96, 192)
#   figures: records [0, 64) | price_per_record [64, 160) | amount_due [160, 256)
MAX_AMOUNT: public(constant(uint256)) = 2**96 - 1
MAX_RECORDS: public(constant(uint256)) = 2**64 - 1
MASK_64: constant(uint256) = 2**64 - 1
MASK_160: constant(uint256) = 2**160 - 1

struct Job:
    head: uint256
    terms: uint256
    figures: uint256
    receipt_hash: bytes32
    hospital_id: bytes32

# What job() returns: a job's fields, unpacked.
struct JobView:
    payer: address
    status: uint8
    budget: uint256
    max_price_per_record: uint256
    deadline: uint256
    hospital_id: bytes32
    receipt_hash: bytes32
    records: uint256
    price_per_record: uint256
    amount_due: uint256

struct Hospital:
    payout: address
    signer: address
    next_payout: address
    next_signer: address
    eta: uint256

event Deposited:
    job_id: indexed(bytes32)
    payer: indexed(address)
    client_job_id: bytes32
    budget: uint256
    max_price_per_record: uint256
    deadline: uint256

event Settled:
    job_id: indexed(bytes32)
    hospital_id: indexed(bytes32)
    payout: indexed(address)
    records: uint256
    price_per_record: uint256
    amount_due: uint256
    hospital_amount: uint256
    treasury_amount: uint256
    payer_refund: uint256
    receipt_hash: bytes32

event MarkedFailed:
    job_id: indexed(bytes32)

event Refunded:
    job_id: indexed(bytes32)
    payer: indexed(address)
    amount: uint256

event Withdrawn:
    account: indexed(address)
    amount: uint256

event HospitalProposed:
    hospital_id: indexed(bytes32)
    payout: address
    signer: address
    eta: uint256

event OperatorChanged:
    previous: indexed(address)
    operator: indexed(address)

token: public(immutable(IERC20))
treasury: public(immutable(address))
registry_delay: public(immutable(uint256))
refund_delay: public(immutable(uint256))
owner: public(address)
operator: public(address)
jobs: HashMap[bytes32, Job]
hospitals: public(HashMap[bytes32, Hospital])
credits: public(HashMap[address, uint256])


@deploy
def __init__(
    _token: IERC20,
    _treasury: address,
    _operator: address,
    _registry_delay: uint256,
    _refund_delay: uint256,
):
    assert _treasury != empty(address), "treasury is zero"
    assert _operator != empty(address), "operator is zero"
    assert _refund_delay > 0, "refund delay is zero"
    token = _token
    treasury = _treasury
    registry_delay = _registry_delay
    refund_delay = _refund_delay
    self.owner = msg.sender
    self.operator = _operator
    log OperatorChanged(previous=empty(address), operator=_operator)


@internal
@pure
def _split(amount_due: uint256) -> (uint256, uint256):
    hospital_amount: uint256 = amount_due * HOSPITAL_SHARE_BPS // BPS
    return hospital_amount, amount_due - hospital_amount


@internal
@view
def _current(hospital_id: bytes32) -> (address, address):
    # Three reads, not five: only the pair in force is loaded.
    eta: uint256 = self.hospitals[hospital_id].eta
    if eta != 0 and block.timestamp >= eta:
        return self.hospitals[hospital_id].next_payout, self.hospitals[hospital_id].next_signer
    return self.hospitals[hospital_id].payout, self.hospitals[hospital_id].signer


@internal
@pure
def _status(head: uint256) -> uint8:
    return convert((head >> 160) & 255, uint8)


@internal
@pure
def _payer(head: uint256) -> address:
    return convert(convert(head & MASK_160, uint160), address)


@internal
@pure
def _deadline(head: uint256) -> uint256:
    return (head >> 168) & MASK_64


@internal
@pure
def _with_status(head: uint256, status: uint8) -> uint256:
    return (head & ~(255 << 160)) | (convert(status, uint256) << 160)


@external
@pure
def job_id_of(payer: address, client_job_id: bytes32) -> bytes32:
    return keccak256(abi_encode(payer, client_job_id))


@external
@view
def settlement_digest(
    job_id: bytes32, receipt_hash: bytes32, records: uint256, price_per_record: uint256
) -> bytes32:
    return self._digest(job_id, receipt_hash, records, price_per_record)


@internal
@view
def _digest(
    job_id: bytes32, receipt_hash: bytes32, records: uint256, price_per_record: uint256
) -> bytes32:
    return keccak256(
        abi_encode(SETTLE_TAG, chain.id, self, job_id, receipt_hash, records, price_per_record)
    )


@external
@view
def hospital(hospital_id: bytes32) -> (address, address):
    """@notice The payout address and settlement signer in force now."""
    return self._current(hospital_id)


@external
@view
def split(job_id: bytes32) -> (uint256, uint256, uint256):
    """@notice (hospital amount, treasury amount, payer refund) of a settled job."""
    job: JobView = self._view(job_id)
    assert job.status == SETTLED, "job not settled"
    hospital_amount: uint256 = 0
    treasury_amount: uint256 = 0
    hospital_amount, treasury_amount = self._split(job.amount_due)
    return hospital_amount, treasury_amount, job.budget - job.amount_due


@external
@view
def job(job_id: bytes32) -> JobView:
    """@notice Everything stored for a job, unpacked (status 0: no such job)."""
    return self._view(job_id)


@internal
@view
def _view(job_id: bytes32) -> JobView:
    job: Job = self.jobs[job_id]
    return JobView(
        payer=self._payer(job.head),
        status=self._status(job.head),
        budget=job.terms & MAX_AMOUNT,
        max_price_per_record=(job.terms >> 96) & MAX_AMOUNT,
        deadline=self._deadline(job.head),
        hospital_id=job.hospital_id,
        receipt_hash=job.receipt_hash,
        records=job.figures & MAX_RECORDS,
        price_per_record=(job.figures >> 64) & MAX_AMOUNT,
        amount_due=job.figures >> 160,
    )


@external
def set_operator(operator: address):
    assert msg.sender == self.owner, "only owner"
    assert operator != empty(address), "operator is zero"
    log OperatorChanged(previous=self.operator, operator=operator)
    self.operator = operator


@external
def propose_hospital(hospital_id: bytes32, payout: address, signer: address):
    """@notice Register or change a hospital; it takes effect after registry_delay."""
    assert msg.sender == self.owner, "only owner"
    assert payout != empty(address), "payout is zero"
    assert signer != empty(address), "signer is zero"
    payout_now: address = empty(address)
    signer_now: address = empty(address)
    payout_now, signer_now = self._current(hospital_id)
    eta: uint256 = block.timestamp + registry_delay
    self.hospitals[hospital_id] = Hospital(
        payout=payout_now, signer=signer_now, next_payout=payout, next_signer=signer, eta=eta
    )
    log HospitalProposed(hospital_id=hospital_id, payout=payout, signer=signer, eta=eta)


@external
def deposit(client_job_id: bytes32, budget: uint256, max_price_per_record: uint256) -> bytes32:
    assert budget > 0, "budget is zero"
    assert budget <= MAX_AMOUNT, "budget too large"
    assert max_price_per_record <= MAX_AMOUNT, "max price too large"
    job_id: bytes32 = keccak256(abi_encode(msg.sender, client_job_id))
    assert self.jobs[job_id].head == 0, "job id in use"
    deadline: uint256 = block.timestamp + refund_delay
    assert deadline <= MASK_64, "deadline too far"
    self.jobs[job_id].head = (
        convert(convert(msg.sender, uint160), uint256)
        | (convert(OPEN, uint256) << 160)
        | (deadline << 168)
    )
    self.jobs[job_id].terms = budget | (max_price_per_record << 96)
    assert extcall token.transferFrom(msg.sender, self, budget, default_return_value=True), "transfer failed"
    log Deposited(
        job_id=job_id,
        payer=msg.sender,
        client_job_id=client_job_id,
        budget=budget,
        max_price_per_record=max_price_per_record,
        deadline=deadline,
    )
    return job_id


@internal
@view
def _assert_open(status: uint8):
    assert status != 0, "unknown job"
    assert status != SETTLED, "job already settled"
    assert status != REFUNDED, "job already refunded"
    assert status != FAILED, "job marked failed"


@external
def settle(
    job_id: bytes32,
    hospital_id: bytes32,
    records: uint256,
    price_per_record: uint256,
    receipt_hash: bytes32,
    node_signature: Bytes[65],
):
    assert msg.sender == self.operator, "only operator"
    head: uint256 = self.jobs[job_id].head
    self._assert_open(self._status(head))
    assert block.timestamp < self._deadline(head), "job past deadline"
    terms: uint256 = self.jobs[job_id].terms
    budget: uint256 = terms & MAX_AMOUNT
    assert price_per_record <= (terms >> 96) & MAX_AMOUNT, "price above maximum"
    assert records <= MAX_RECORDS, "records too large"
    payout: address = empty(address)
    signer: address = empty(address)
    payout, signer = self._current(hospital_id)
    assert signer != empty(address), "unknown hospital"

    digest: bytes32 = keccak256(
        concat(
            b"\x19Ethereum Signed Message:\n32",
            self._digest(job_id, receipt_hash, records, price_per_record),
        )
    )
    r: uint256 = convert(extract32(node_signature, 0), uint256)
    s: uint256 = convert(extract32(node_signature, 32), uint256)
    v: uint256 = convert(slice(node_signature, 64, 1), uint256)
    assert s <= HALF_N, "bad node signature"
    assert ecrecover(digest, v, r, s) == signer, "bad node signature"

    amount_due: uint256 = min(budget, records * price_per_record)
    hospital_amount: uint256 = 0
    treasury_amount: uint256 = 0
    hospital_amount, treasury_amount = self._split(amount_due)
    payer_refund: uint256 = budget - amount_due

    self.jobs[job_id].head = self._with_status(head, SETTLED)
    self.jobs[job_id].figures = records | (price_per_record << 64) | (amount_due << 160)
    self.jobs[job_id].receipt_hash = receipt_hash
    self.jobs[job_id].hospital_id = hospital_id
    self.credits[payout] += hospital_amount
    self.credits[treasury] += treasury_amount
    self.credits[self._payer(head)] += payer_refund
    log Settled(
        job_id=job_id,
        hospital_id=hospital_id,
        payout=payout,
        records=records,
        price_per_record=price_per_record,
        amount_due=amount_due,
        hospital_amount=hospital_amount,
        treasury_amount=treasury_amount,
        payer_refund=payer_refund,
        receipt_hash=receipt_hash,
    )


@external
def mark_failed(job_id: bytes32):
    assert msg.sender == self.operator, "only operator"
    head: uint256 = self.jobs[job_id].head
    self._assert_open(self._status(head))
    self.jobs[job_id].head = self._with_status(head, FAILED)
    log MarkedFailed(job_id=job_id)


@external
def refund(job_id: bytes32):
    """@notice The payer's whole deposit back, after mark_failed or after the deadline."""
    head: uint256 = self.jobs[job_id].head
    status: uint8 = self._status(head)
    assert status != 0, "unknown job"
    assert msg.sender == self._payer(head), "only payer"
    assert status != SETTLED, "job already settled"
    assert status != REFUNDED, "job already refunded"
    assert status == FAILED or block.timestamp >= self._deadline(head), "job still open"
    budget: uint256 = self.jobs[job_id].terms & MAX_AMOUNT
    self.jobs[job_id].head = self._with_status(head, REFUNDED)
    self.credits[msg.sender] += budget
    log Refunded(job_id=job_id, payer=msg.sender, amount=budget)


@external
def withdraw() -> uint256:
    amount: uint256 = self.credits[msg.sender]
    assert amount > 0, "nothing to withdraw"
    self.credits[msg.sender] = 0
    assert extcall token.transfer(msg.sender, amount, default_return_value=True), "transfer failed"
    log Withdrawn(account=msg.sender, amount=amount)
    return amount
