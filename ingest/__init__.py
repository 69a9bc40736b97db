"""Hospital-side ingestion: Synthea records → de-identified case dialogues; guideline documents → chunks."""
