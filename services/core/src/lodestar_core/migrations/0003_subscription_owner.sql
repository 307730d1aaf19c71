-- A subscription belongs to the principal that created it: a module credential may open only the
-- subscriptions it owns. '' marks subscriptions created before owners were recorded, or by an
-- admin; only admins may open those.
ALTER TABLE subscriptions ADD COLUMN owner text NOT NULL DEFAULT '';
