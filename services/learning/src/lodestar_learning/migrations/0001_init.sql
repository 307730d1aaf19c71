-- learning's schema (learning by default) is created by the migration runner, which records this
-- file in its schema_migrations table. The service's tables come with its features, each in a
-- migration of its own (0002_..., never by editing this one).
SELECT 1;
