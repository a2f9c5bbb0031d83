-- Placeholder: migration 0008 belongs to the delta-updates work (issue 18, first half), built on
-- another branch at the same time. Migrations must be numbered without gaps, so the secrets
-- branch carries this empty one to be able to use 0009. When the two branches merge, this file
-- is dropped in favour of the real 0008 (no released database has ever run it).
SELECT 1;
