"""The request core: authenticate, validate (one validator for every door), then run the request
(admit, reserve, queue, place, relay, settle) with one abort path."""
