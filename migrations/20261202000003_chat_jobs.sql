-- Jobs submitted as a chat (the OpenAI-compatible surface) keep their whole message
-- list and sampling options here; the initial stage sends the messages to every model.
-- NULL for jobs submitted as one prompt.
ALTER TABLE jobs ADD COLUMN chat jsonb;
