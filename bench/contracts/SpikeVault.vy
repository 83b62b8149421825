# pragma version 0.4.3
"""
@title SpikeVault
@notice The baseline for bench/settlement_gas.py: the first escrow spike, rebuilt from its
        description. An operator settles a job by pushing 70% of the amount to the hospital
        and 30% to the treasury, and the unused budget back to the payer, in three token
        transfers. No signature check, no refund path, no pull payments, no registry, no
        stored receipt: everything ClearingVault adds for safety is missing here. Never
        deploy it.
"""

from ethereum.ercs import IERC20

struct Job:
    payer: address
    budget: uint256
    settled: bool

token: immutable(IERC20)
treasury: immutable(address)
operator: immutable(address)
jobs: public(HashMap[bytes32, Job])


@deploy
def __init__(_token: IERC20, _treasury: address, _operator: address):
    token = _token
    treasury = _treasury
    operator = _operator


@external
def deposit(job_id: bytes32, budget: uint256):
    assert self.jobs[job_id].payer == empty(address), "job id in use"
    self.jobs[job_id] = Job(payer=msg.sender, budget=budget, settled=False)
    assert extcall token.transferFrom(msg.sender, self, budget, default_return_value=True)


@external
def settle(job_id: bytes32, hospital: address, amount: uint256):
    assert msg.sender == operator, "only operator"
    job: Job = self.jobs[job_id]
    assert not job.settled, "settled"
    due: uint256 = min(amount, job.budget)
    to_hospital: uint256 = due * 7000 // 10000
    self.jobs[job_id].settled = True
    assert extcall token.transfer(hospital, to_hospital, default_return_value=True)
    assert extcall token.transfer(treasury, due - to_hospital, default_return_value=True)
    assert extcall token.transfer(job.payer, job.budget - due, default_return_value=True)
