"""What the API and the workers share: settings, storage, job records and the queue."""
