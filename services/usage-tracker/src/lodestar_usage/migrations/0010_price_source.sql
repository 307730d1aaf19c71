-- Where each price came from: "SetPrice", or the source an ImportPrices call named.
ALTER TABLE prices ADD COLUMN source text NOT NULL DEFAULT '';
