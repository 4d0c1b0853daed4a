#!/usr/bin/env python3
"""A billing client in another language: Python with grpcio, its stubs
generated from proto/ into a temporary directory at each run.

Drives the product the way a client would — create an account, a card with
3-D Secure, Add Funds, a usage debit with 6 decimals, low-balance settings
and notification settings, then WatchBalanceEvents until the automatic
top-up — and reads the structured error details (google.rpc.Status in
grpc-status-details-bin) of failures without parsing any message.
Run by tests/cli/python_client.rs against `billing serve`; prints one line
per step and exits non-zero with the reason when a check fails.

Usage: billing_client.py --address HOST:PORT --proto DIR --service-token T
                         --admin-token T (acme) --other-admin-token T (globex)
"""

import argparse
import importlib
import importlib.resources
import queue
import sys
import tempfile
import threading
import time


def generate_stubs(proto_dir, out_dir):
    """Runs protoc (grpcio-tools) on every billing.v1 proto into out_dir."""
    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    files = [
        "billing/v1/balances.proto",
        "billing/v1/balance_policy.proto",
        "billing/v1/payment_methods.proto",
        "billing/v1/notifications.proto",
        "billing/v1/errors.proto",
    ]
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    )
    if code != 0:
        sys.exit(f"protoc failed ({code}) on {proto_dir}")
    sys.path.insert(0, out_dir)


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def details_of(error):
    """(code name, ErrorInfo, {detail type: message}) of a failed call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    check(status is not None, f"{error.code().name} carries a google.rpc.Status")
    found = {}
    for kind in ("ErrorInfo", "BadRequest", "PreconditionFailure", "RetryInfo"):
        message_type = getattr(error_details_pb2, kind)
        for detail in status.details:
            if detail.Is(message_type.DESCRIPTOR):
                unpacked = message_type()
                detail.Unpack(unpacked)
                found[kind] = unpacked
    info = found.get("ErrorInfo")
    check(info is not None and info.domain == "billing.v1",
          f"{error.code().name} has an ErrorInfo of domain billing.v1")
    return error.code().name, info, found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--proto", required=True)
    parser.add_argument("--service-token", required=True)
    parser.add_argument("--admin-token", required=True)
    parser.add_argument("--other-admin-token", required=True)
    args = parser.parse_args()

    import grpc

    out_dir = tempfile.mkdtemp(prefix="billing-py-stubs-")
    generate_stubs(args.proto, out_dir)
    v1 = "billing.v1."
    balances = importlib.import_module(v1 + "balances_pb2")
    balances_grpc = importlib.import_module(v1 + "balances_pb2_grpc")
    policy = importlib.import_module(v1 + "balance_policy_pb2")
    policy_grpc = importlib.import_module(v1 + "balance_policy_pb2_grpc")
    methods = importlib.import_module(v1 + "payment_methods_pb2")
    methods_grpc = importlib.import_module(v1 + "payment_methods_pb2_grpc")
    notices = importlib.import_module(v1 + "notifications_pb2")
    notices_grpc = importlib.import_module(v1 + "notifications_pb2_grpc")
    errors = importlib.import_module(v1 + "errors_pb2")

    # Every call is gzip-compressed; the server answers in kind.
    channel = grpc.insecure_channel(args.address, compression=grpc.Compression.Gzip)
    grpc.channel_ready_future(channel).result(timeout=30)
    ledger = balances_grpc.BalancesStub(channel)
    panel = policy_grpc.BalancePolicyStub(channel)
    cards = methods_grpc.PaymentMethodsStub(channel)
    mail = notices_grpc.NotificationsStub(channel)
    service = [("authorization", f"Bearer {args.service_token}")]
    admin = [("authorization", f"Bearer {args.admin_token}")]
    other_admin = [("authorization", f"Bearer {args.other_admin_token}")]
    timeout = 30

    # An account, and a second one with no card (for a precondition failure).
    for account in ("acme", "globex"):
        created = ledger.CreateAccount(
            balances.CreateAccountRequest(account_id=account, currency="USD",
                                          billing_email=f"ops@{account}.example"),
            metadata=service, timeout=timeout)
        check(created.account.currency == "USD", f"CreateAccount {account}")

    # A card that needs 3-D Secure at set-up (sandbox test card), confirmed.
    added = cards.AddCard(
        methods.AddCardRequest(
            account_id="acme",
            card=methods.CardDetails(number="4000002500003155", exp_month=12,
                                     exp_year=time.gmtime().tm_year + 2, cvc="123",
                                     holder_name="Ada Lovelace"),
            idempotency_key="py-card-1"),
        metadata=admin, timeout=timeout)
    check(added.payment_method.status
          == methods.PAYMENT_METHOD_STATUS_PENDING_AUTHENTICATION
          and added.next_action.type == "three_d_secure",
          "AddCard answers PENDING_AUTHENTICATION with a 3-D Secure next_action")
    confirmed = cards.ConfirmCard(
        methods.ConfirmCardRequest(
            account_id="acme", payment_method_id=added.payment_method.payment_method_id,
            authentication_result=methods.AUTHENTICATION_RESULT_PASSED),
        metadata=admin, timeout=timeout)
    check(confirmed.payment_method.status == methods.PAYMENT_METHOD_STATUS_ACTIVE,
          "ConfirmCard activates the card")
    funded = cards.AddFunds(
        methods.AddFundsRequest(account_id="acme", amount="50.00",
                                idempotency_key="py-funds-1"),
        metadata=admin, timeout=timeout)
    check(funded.top_up.status == policy.TOP_UP_STATUS_SUCCEEDED
          and funded.balance == "50.00", "AddFunds charges the card: balance 50.00")

    # Usage with six fractional digits.
    debit = ledger.Debit(
        balances.DebitRequest(account_id="acme", amount="0.123456",
                              idempotency_key="py-usage-1", description="a call"),
        metadata=service, timeout=timeout)
    check(debit.balance == "49.876544", f"Debit 0.123456 leaves 49.876544 ({debit.balance})")

    # Settings: auto refill below 45.00, the low-balance email, recipients.
    settings = panel.ApplyLowBalanceSettings(
        policy.ApplyLowBalanceSettingsRequest(
            account_id="acme", auto_refill_enabled=True, threshold="45.00",
            refill_amount="30.00", notification_enabled=True,
            notification_threshold="40.00"),
        metadata=admin, timeout=timeout)
    check(settings.settings.auto_refill_enabled and settings.started_top_up_id == "",
          "ApplyLowBalanceSettings turns auto refill on (no top-up yet)")
    recipients = mail.UpdateNotificationSettings(
        notices.UpdateNotificationSettingsRequest(
            account_id="acme", recipients=["billing@acme.example"]),
        metadata=admin, timeout=timeout)
    check(list(recipients.settings.recipients) == ["billing@acme.example"],
          "UpdateNotificationSettings sets the recipients")

    # The event stream, from the start, until the automatic top-up.
    events = queue.Queue()
    stream = ledger.WatchBalanceEvents(
        balances.WatchBalanceEventsRequest(account_id="acme", after_cursor=0),
        metadata=admin, timeout=60)

    def follow():
        try:
            for message in stream:
                events.put(message.event)
        except grpc.RpcError as error:
            events.put(error)

    threading.Thread(target=follow, daemon=True).start()
    ledger.Debit(
        balances.DebitRequest(account_id="acme", amount="10.00",
                              idempotency_key="py-usage-2"),
        metadata=service, timeout=timeout)
    kinds = []
    deadline = time.monotonic() + 60
    while True:
        remaining = deadline - time.monotonic()
        check(remaining > 0, f"a TOPPED_UP event after the debit within 60 s (saw {kinds})")
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            continue
        if isinstance(event, grpc.RpcError):
            sys.exit(f"FAILED: the stream ended: {event.code().name} {event.details()}")
        kinds.append(balances.BalanceEventKind.Name(event.kind))
        if kinds[-1] == "BALANCE_EVENT_KIND_TOPPED_UP" and "BALANCE_EVENT_KIND_DEBITED" in kinds[1:]:
            break
    stream.cancel()
    check(kinds[:3] == ["BALANCE_EVENT_KIND_TOPPED_UP", "BALANCE_EVENT_KIND_DEBITED",
                        "BALANCE_EVENT_KIND_DEBITED"],
          f"the stream replays the history first ({kinds})")
    top_ups = panel.ListTopUps(policy.ListTopUpsRequest(account_id="acme"),
                               metadata=admin, timeout=timeout)
    check(top_ups.top_ups[0].trigger == policy.TOP_UP_TRIGGER_AUTOMATIC,
          "the last top-up is automatic")

    # 1. Two bad fields of one card: BadRequest lists both.
    try:
        cards.AddCard(
            methods.AddCardRequest(
                account_id="acme",
                card=methods.CardDetails(number="4242424242424242", exp_month=13,
                                         exp_year=time.gmtime().tm_year + 2, cvc="1",
                                         holder_name="Ada"),
                idempotency_key="py-bad-card"),
            metadata=admin, timeout=timeout)
        sys.exit("FAILED: a card with month 13 and a one-digit CVC was accepted")
    except grpc.RpcError as error:
        code, info, found = details_of(error)
        fields = [v.field for v in found["BadRequest"].field_violations]
        check(code == "INVALID_ARGUMENT" and info.reason == "INVALID_FIELD"
              and fields == ["card.exp_month", "card.cvc"],
              f"BadRequest names both bad fields ({fields})")

    # 2. Insufficient funds: the reason, as the proto enum names it.
    try:
        ledger.Debit(balances.DebitRequest(account_id="acme", amount="1000000.00",
                                           idempotency_key="py-too-much"),
                     metadata=service, timeout=timeout)
        sys.exit("FAILED: a debit beyond the balance was accepted")
    except grpc.RpcError as error:
        code, info, found = details_of(error)
        reason = errors.ErrorReason.Value("ERROR_REASON_" + info.reason)
        check(code == "FAILED_PRECONDITION"
              and reason == errors.ERROR_REASON_INSUFFICIENT_FUNDS,
              "ErrorInfo.reason is INSUFFICIENT_FUNDS, a value of billing.v1.ErrorReason")

    # 3. Auto refill without a card: FAILED_PRECONDITION with PreconditionFailure.
    try:
        panel.ApplyLowBalanceSettings(
            policy.ApplyLowBalanceSettingsRequest(
                account_id="globex", auto_refill_enabled=True, threshold="10.00",
                refill_amount="30.00"),
            metadata=other_admin, timeout=timeout)
        sys.exit("FAILED: auto refill without a payment method was accepted")
    except grpc.RpcError as error:
        code, info, found = details_of(error)
        violation = found["PreconditionFailure"].violations[0]
        check(code == "FAILED_PRECONDITION"
              and info.reason == "NO_AUTO_CHARGE_PAYMENT_METHOD"
              and violation.type == "NO_AUTO_CHARGE_PAYMENT_METHOD"
              and violation.subject == "accounts/globex",
              f"PreconditionFailure names the account ({violation.subject})")

    print("python client: all checks passed", flush=True)


if __name__ == "__main__":
    main()
