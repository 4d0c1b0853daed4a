-- The Stripe gateway's own state. Like the sandbox's tables, these know
-- accounts only as opaque references and hold no card data: Stripe ids only.

-- One Stripe Customer per account, created with the account's first card.
CREATE TABLE stripe_customers (
    account_id  TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Each saved card (PaymentMethod) with the Customer it is attached to and
-- the SetupIntent that attached it (ConfirmCard reads its final state).
CREATE TABLE stripe_payment_methods (
    payment_method_id TEXT PRIMARY KEY,
    customer_id       TEXT NOT NULL,
    setup_intent_id   TEXT NOT NULL,
    detached_at       TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Webhook events already applied: a replayed event id is acknowledged, not re-applied.
CREATE TABLE stripe_webhook_events (
    event_id    TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
